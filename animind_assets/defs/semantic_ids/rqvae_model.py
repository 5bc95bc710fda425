"""``rqvae_model``: the item quantizer fitted on ``anime_embeddings`` that feeds ``semantic_ids``.

Config field ``preset`` picks it (see ``animind_assets.lib.semantic_ids.quantizers.config``): ``default`` = residual
k-means with a Ward-seeded first level (meets the ID targets on MAL 2020 in ~40 s on 2 CPU cores),
``rqkmeans`` (k-means++ seeds), ``rqvae`` (TIGER-like RQ-VAE: MLP 384-256-128-32, 3 x 256 codes,
EMA codebooks), ``conservative`` / ``aggressive`` (the original AniMind tokenizer's RQ-VAE
configs); every knob can be overridden in the launchpad.

Thin layer over ``animind_assets.lib.semantic_ids.quantizers``: loads the embedding frame, resolves the preset plus
overrides, trains (or resumes), logs every epoch to MLflow and writes the best/last checkpoints
atomically at deterministic store paths:

* ``<artifacts>/rqvae_model/model.pt`` (best by validation loss; read by ``semantic_ids``)
* ``<artifacts>/rqvae_model/last.pt`` (resume point)
* dry runs go to ``<artifacts>/rqvae_model/dry_run/`` so they never replace the real model.
"""



import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.semantic_ids.quantizers import PRESETS, preset_config
from animind_assets.resources import ArtifactStoreResource, MlflowResource

from animind_assets.launchpad import settings_defaults
from animind_assets.defs.semantic_ids.quantizer_fit import (  # noqa: F401
    CHECKPOINT_NAME,
    GROUP,
    RQVAE_DIR,
    QuantizerOverrides,
    run_quantizer,
)

@settings_defaults("rqvae_model")
class RqvaeModelConfig(QuantizerOverrides):
    preset: str = Field("default", description=f"named preset: {', '.join(PRESETS)}")
    resume: str = Field("", description="'' (fresh), 'last', 'best' or a checkpoint path/URL")
    dry_run: bool = Field(False, description="tiny bounded run written under rqvae_model/dry_run/")


@dg.asset(
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "mlflow"},
    description="Hierarchical item quantizer (preset: default = Ward-seeded residual k-means; rqvae, "
    "rqkmeans, conservative, aggressive) fitted on anime_embeddings; checkpoint at "
    "<artifacts>/rqvae_model/model.pt (+ last.pt).",
)
def rqvae_model(
    context: dg.AssetExecutionContext,
    config: RqvaeModelConfig,
    artifacts: ArtifactStoreResource,
    mlflow: MlflowResource,
    anime_embeddings: pl.DataFrame,
) -> dg.MaterializeResult:
    cfg = preset_config(config.preset, **config.overrides())
    store_dir = f"{RQVAE_DIR}/dry_run" if config.dry_run else RQVAE_DIR
    _, md = run_quantizer(
        context,
        cfg,
        anime_embeddings,
        artifacts,
        mlflow,
        store_dir=store_dir,
        run_name=f"rqvae_model[{config.preset}]",
        resume=config.resume,
        tags={"preset": config.preset},
    )
    md["preset"] = dg.MetadataValue.text(config.preset)
    return dg.MaterializeResult(metadata=md)
