"""``beauty_semantic_ids``: one unique semantic ID per Beauty item, the project's own pipeline.

Trains the generic quantizer (``animind_assets.lib.semantic_ids.quantizers``; preset ``default`` = the library's default,
currently residual k-means 3x256; preset ``rqvae`` = TIGER's RQ-VAE 3x256) on
``beauty_embeddings`` and appends TIGER's disambiguation level (``animind_assets.lib.semantic_ids.assign``),
so every item has a distinct ``(c1, ..., cL, d)`` tuple. Quantizer checkpoints are written atomically
under ``<artifacts>/beauty_semantic_ids/quantizer/`` (``model.pt`` best, ``last.pt`` resume point).
Table columns: item_id, codes, semantic_id, code_l1..code_lL, collision_group_size, text.
"""

import json
import time
from typing import Optional

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from animind_assets.defs.beauty.shared import GROUP
from animind_assets.lib.semantic_ids.quantizers import PRESETS, preset_config, train_quantizer
from animind_assets.lib.semantic_ids.quantizers.metrics import code_stats
from animind_assets.lib.semantic_ids.assign import assign_semantic_ids, frame_vectors, level_sizes, semantic_id_frame
from animind_assets.meta import bar_plot, counts_md, lines_plot, scalar_metadata, table_metadata
from animind_assets.resources import ArtifactStoreResource, MlflowResource, ParquetExports
from animind_assets.launchpad import settings_defaults

ASSET = "beauty_semantic_ids"
QUANTIZER_DIR = ("beauty_semantic_ids", "quantizer")


@settings_defaults("beauty_semantic_ids")
class BeautySemanticIdsConfig(dg.Config):
    preset: str = Field("default", description=f"quantizer preset: {', '.join(PRESETS)} (default = the library default, RQ-KMeans 3x256; 'rqvae' = TIGER's RQ-VAE)")
    quantizer: Optional[str] = Field(None, description="override: 'rqvae' | 'rqkmeans'")
    levels: Optional[int] = Field(None, description="override: quantizer levels (the disambiguation level is added on top)")
    codebook_size: Optional[int] = Field(None, description="override: codes per level")
    epochs: Optional[int] = Field(None, description="override: RQ-VAE training epochs")
    batch_size: Optional[int] = Field(None, description="override: RQ-VAE batch size")
    lr: Optional[float] = Field(None, description="override: RQ-VAE learning rate")
    seed: int = Field(42, description="random seed")
    device: str = Field("auto", description="auto | cpu | cuda")
    num_threads: int = Field(2, description="torch CPU threads (0 = leave as is)")
    resume: str = Field("", description="'' (fresh), 'last', 'best' or a checkpoint path")
    min_dedup_vocab: int = Field(0, description="minimum vocabulary of the disambiguation level")

    def quantizer_config(self):
        overrides = {
            k: v
            for k, v in {
                "quantizer": self.quantizer,
                "levels": self.levels,
                "codebook_size": self.codebook_size,
                "epochs": self.epochs,
                "batch_size": self.batch_size,
                "lr": self.lr,
            }.items()
            if v is not None
        }
        return preset_config(self.preset, seed=self.seed, device=self.device, num_threads=self.num_threads, **overrides)


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "polars", "duckdb"},
    description="Unique semantic ID per Beauty item from the project's quantizer (+ disambiguation level).",
)
def beauty_semantic_ids(
    context: dg.AssetExecutionContext,
    config: BeautySemanticIdsConfig,
    artifacts: ArtifactStoreResource,
    exports: ParquetExports,
    mlflow: MlflowResource,
    beauty_embeddings: pl.DataFrame,
    beauty_items: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    t0 = time.perf_counter()
    ids, x = frame_vectors(beauty_embeddings, "item_id", "embedding", table="beauty_embeddings")
    qcfg = config.quantizer_config()
    store = artifacts.store()
    ckpt_dir = store.path(*QUANTIZER_DIR)
    store.sweep(*QUANTIZER_DIR, log=context.log.info)  # temp files of killed runs
    context.log.info(f"{ASSET}: {len(ids)} vectors of dim {x.shape[1]}; {qcfg.quantizer} {qcfg.levels}x{qcfg.codebook_size}")
    with mlflow.start_run(context) as run:
        run.log_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in qcfg.used_params().items()})

        def on_epoch(rec: dict) -> None:
            run.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=int(rec["epoch"]))

        result = train_quantizer(x, qcfg, log=context.log.info, on_epoch=on_epoch, checkpoint_dir=ckpt_dir, resume=config.resume or None)
        run.log_metrics({f"final_{k}": v for k, v in result.metrics.items()})
        run_link = run.link
    if not result.finished:
        raise dg.Failure(
            description=f"{ASSET}: quantizer training stopped after epoch {result.metrics.get('epochs_completed')} of "
            f"{result.config.epochs} (stop_after_epochs); IDs from an unfinished quantizer are not published. "
            "Resume with resume='last' to finish."
        )
    codes = result.codes
    k_fit = int(result.config.codebook_size)  # < the request on catalogs smaller than codebook_size (small_catalog)
    before = code_stats(codes, k_fit)
    full = assign_semantic_ids(codes, order_key=ids)
    df = semantic_id_frame(ids, full, id_column="item_id")
    if "text" in beauty_items.columns:
        df = df.join(beauty_items.select(["item_id", "asin", "text"]), on="item_id", how="left")
    export = exports.write(df, ASSET)
    sizes = level_sizes(full, k_fit, config.min_dedup_vocab)
    usable = min(len(ids), k_fit)  # a level cannot use more codes than there are items
    usage = [len(np.unique(full[:, lv])) / usable for lv in range(full.shape[1] - 1)]
    missing = sorted(set(beauty_items["item_id"].to_list()) - set(ids.tolist()))
    if missing:
        context.log.warning(f"{ASSET}: {len(missing)} items of beauty_items have no embedding/ID, e.g. {missing[:5]}")
    prefix_unique = df.select([f"code_l{i + 1}" for i in range(codes.shape[1])]).unique().height
    groups = df["collision_group_size"].value_counts().sort("collision_group_size")
    md = {
        **table_metadata(df, preview_cols=[c for c in ("item_id", "semantic_id", "collision_group_size", "text") if c in df.columns]),
        **scalar_metadata(
            {
                "items": df.height,
                "quantizer": qcfg.quantizer,
                "levels_with_disambiguation": int(full.shape[1]),
                "codebook_size": k_fit,
                "requested_codebook_size": int(qcfg.codebook_size),
                "usable_codes_per_level": usable,
                "distinct_quantizer_prefixes": prefix_unique,
                "unique_fraction_before_disambiguation": before["unique_fraction"],
                "largest_collision_group": before["largest_collision_group"],
                "disambiguation_vocab": sizes[-1],
                "unique_after_disambiguation": df["semantic_id"].n_unique() == df.height,
                "items_missing_id": len(missing),
                "recon_loss": result.metrics.get("recon_loss"),
                "train_seconds": round(result.train_seconds, 2),
                "materialize_seconds": round(time.perf_counter() - t0, 2),
                "checkpoint": str(result.checkpoints.get("best", "")),
                "mlflow_run": run_link,
            }
        ),
        **{f"usage_l{i + 1}": dg.MetadataValue.float(round(float(u), 4)) for i, u in enumerate(usage)},
        "collision_groups": counts_md(
            {str(r["collision_group_size"]): r["count"] for r in groups.iter_rows(named=True)}, key="items sharing codes", value="items"
        ),
        **bar_plot("usage_plot", {f"L{i + 1}": u for i, u in enumerate(usage)}, f"fraction of min(items, codebook_size) = {usable} codes used per level", "fraction"),
        "parquet_export": dg.MetadataValue.path(export),
        "reference_note": dg.MetadataValue.text(
            "the reference index_rqvae.json (tiger-cf) has 11,412 distinct 3-code prefixes for 12,101 items, built from "
            "LLaMA-7B embeddings of title/categories/description; these IDs come from ~5 title words only"
        ),
    }
    if len(result.history) > 1 and all("train_loss" in h for h in result.history):
        md.update(lines_plot("loss_plot", {"train": [h["train_loss"] for h in result.history]}, "quantizer loss", logy=True))
    context.log.info(
        f"{ASSET}: {df.height} IDs, {prefix_unique} distinct quantizer prefixes, largest collision group "
        f"{before['largest_collision_group']}, in {time.perf_counter() - t0:.1f}s"
    )
    return dg.Output(df, metadata=md)
