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

Stable IDs (``lib.semantic_ids.stable``): a rebuild keeps the fitted quantizer (no retraining, the
checkpoint stays as it is) unless ``refit: true``, a resume, a change of the quantizer's fit
settings or code, a new embedding dimension, or drift past ``max_recon_increase`` /
``max_usage_shift`` (measured on the current embeddings against the fit-time values). The
metadata says which, with the measured drift. The asset's data version is the fitted model's
fingerprint, so ``semantic_ids`` sees a new quantizer only when one was fitted.
"""


import dagster as dg
import polars as pl
from pydantic import Field

from animind_assets.launchpad import settings_defaults
from animind_assets.defs.semantic_ids.quantizer_fit import (  # noqa: F401
    CHECKPOINT_NAME,
    GROUP,
    RQVAE_DIR,
    QuantizerOverrides,
    run_quantizer,
)
from animind_assets.gpu import GPU_OP_TAGS, GPU_POOL
from animind_assets.lib.semantic_ids.assign import frame_vectors
from animind_assets.lib.semantic_ids.quantizers import PRESETS, load_quantizer, preset_config
from animind_assets.lib.semantic_ids.stable import DriftThresholds, decide_refit, measure_drift, model_fingerprint
from animind_assets.meta import CONTENT_VERSION_TAGS, scalar_metadata
from animind_assets.resources import ArtifactStoreResource, MlflowResource

_DEFAULT_DRIFT = DriftThresholds()


@settings_defaults("rqvae_model")
class RqvaeModelConfig(QuantizerOverrides):
    preset: str = Field("default", description=f"named preset: {', '.join(PRESETS)}")
    resume: str = Field("", description="'' (fresh), 'last', 'best' or a checkpoint path/URL")
    dry_run: bool = Field(False, description="tiny bounded run written under rqvae_model/dry_run/")
    refit: bool = Field(
        False,
        description="fit a new quantizer even when the fitted one is still valid (reassigns semantic IDs; "
        "downstream LLM assets become stale)",
    )
    max_recon_increase: float = Field(
        _DEFAULT_DRIFT.max_recon_increase,
        description="refit when the reconstruction error on the current embeddings exceeds the fit-time "
        "value by more than this fraction (0 = never)",
    )
    max_usage_shift: float = Field(
        _DEFAULT_DRIFT.max_usage_shift,
        description="refit when a level's code distribution moved more than this total-variation distance "
        "from fit time (0 = never)",
    )


@dg.asset(
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    kinds={"pytorch", "mlflow"},
    tags=CONTENT_VERSION_TAGS,  # data version = quantizer fingerprint: a kept quantizer changes nothing downstream
    description="Hierarchical item quantizer (preset: default = Ward-seeded residual k-means; rqvae, "
    "rqkmeans, conservative, aggressive) fitted on anime_embeddings; checkpoint at "
    "<artifacts>/rqvae_model/model.pt (+ last.pt). Kept across rebuilds unless refit is requested, "
    "its settings or code change, or drift crosses the thresholds.",
)
def rqvae_model(
    context: dg.AssetExecutionContext,
    config: RqvaeModelConfig,
    artifacts: ArtifactStoreResource,
    mlflow: MlflowResource,
    anime_embeddings: pl.DataFrame,
) -> dg.MaterializeResult:
    cfg = preset_config(config.preset, **config.overrides())
    store = artifacts.store()
    ckpt = str(store.path(RQVAE_DIR, CHECKPOINT_NAME))
    if config.dry_run:
        _, md = run_quantizer(
            context, cfg, anime_embeddings, artifacts, mlflow, store_dir=f"{RQVAE_DIR}/dry_run",
            run_name=f"rqvae_model[{config.preset}] dry run", resume=config.resume, tags={"preset": config.preset},
        )
        md["preset"] = dg.MetadataValue.text(config.preset)
        # the published checkpoint is untouched: keep its fingerprint as the data version, so a dry run
        # does not look like a new quantizer to semantic_ids' automation
        published = None
        if store.exists(RQVAE_DIR, CHECKPOINT_NAME):
            try:
                published = model_fingerprint(load_quantizer(ckpt)[1]["model_state"])
            except (OSError, ValueError, RuntimeError, KeyError):
                published = None
        return dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(published) if published else None)

    payload = model = None
    load_note = ""
    if store.exists(RQVAE_DIR, CHECKPOINT_NAME):
        try:
            model, payload = load_quantizer(ckpt)
        except (ValueError, RuntimeError, KeyError) as exc:
            load_note = f"existing checkpoint unusable ({exc})"
    ids, x = frame_vectors(anime_embeddings, "anime_id", "embedding", table="anime_embeddings")
    drift = None
    if payload is not None and "fit_reference" in payload and int(payload["input_dim"]) == x.shape[1]:
        drift, _ = measure_drift(model, payload, x)
    thresholds = DriftThresholds(config.max_recon_increase, config.max_usage_shift)
    decision = decide_refit(
        payload, cfg.to_dict(), input_dim=x.shape[1], refit_requested=config.refit,
        resume_requested=bool(config.resume), drift=drift, thresholds=thresholds, checkpoint=ckpt,
    )
    if load_note:
        decision.reasons.insert(0, load_note)
    context.log.info(f"rqvae_model: {'refit' if decision.refit else 'keep'}: {decision.summary}")
    drift_md = {f"drift_{k}": v for k, v in (drift.as_dict() if drift else {}).items()}
    if decision.refit:
        fit, md = run_quantizer(
            context, cfg, anime_embeddings, artifacts, mlflow, store_dir=RQVAE_DIR,
            run_name=f"rqvae_model[{config.preset}]", resume=config.resume, tags={"preset": config.preset},
        )
        fingerprint = fit.quantizer_fingerprint
        md["fit_action"] = dg.MetadataValue.text("refit")
    else:
        fingerprint = model_fingerprint(payload["model_state"])
        m = payload.get("metrics", {})
        md = scalar_metadata(
            {
                "fit_action": "kept",
                "quantizer": payload.get("kind"),
                "items": len(ids),
                "items_at_fit": drift.items_fit if drift else None,
                "input_dim": int(payload["input_dim"]),
                "levels": int(payload["config"]["levels"]),
                "codebook_size": int(payload["config"]["codebook_size"]),
                "unique_fraction_before_disambiguation_at_fit": round(float(m["unique_fraction"]), 4) if "unique_fraction" in m else None,
                "quantizer_fingerprint": fingerprint,
            }
        )
        md["checkpoint"] = dg.MetadataValue.path(ckpt)
        md["config"] = dg.MetadataValue.json(payload["config"])
    md["fit_reason"] = dg.MetadataValue.text(decision.summary)
    md.update(scalar_metadata(drift_md))
    md["drift_thresholds"] = dg.MetadataValue.json(
        {"max_recon_increase": thresholds.max_recon_increase, "max_usage_shift": thresholds.max_usage_shift}
    )
    if decision.config_changes:
        md["config_changes"] = dg.MetadataValue.json({k: {"was": a, "now": b} for k, (a, b) in decision.config_changes.items()})
    md["preset"] = dg.MetadataValue.text(config.preset)
    return dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(fingerprint))
