"""Shared Dagster-layer pieces of the semantic_ids group: the quantizer-fit overrides (launchpad
config) and ``run_quantizer`` (load the frame -> ``lib.semantic_ids.fit.fit_quantizer`` -> MLflow +
metadata), used by ``rqvae_model`` and ``rqvae_variants``."""

import json
from typing import Any

import dagster as dg
import polars as pl

from animind_assets.launchpad import derive_config

from animind_assets.lib.semantic_ids.assign import frame_vectors
from animind_assets.lib.semantic_ids.fit import QuantizerFit, embedding_provenance, fit_quantizer
from animind_assets.lib.semantic_ids.quantizers import QuantizerConfig
from animind_assets.lib.common.plots import bars_svg, lines_svg
from animind_assets.meta import image_md, markdown_table, scalar_metadata, svg_md
from animind_assets.resources import ArtifactStoreResource, MlflowResource

GROUP = "semantic_ids"
RQVAE_DIR = "rqvae_model"
CHECKPOINT_NAME = "model.pt"


_QuantizerFields = derive_config(
    QuantizerConfig,
    name="QuantizerOverrides",
    all_optional=True,
    descriptions={
        "quantizer": "'rqvae' | 'rqkmeans'",
        "hidden_dims": 'encoder MLP hidden widths (decoder mirrors)',
        "decoder_hidden_dims": 'decoder hidden widths (default: mirror)',
        "latent_dim": 'latent (codebook vector) dimension',
        "levels": 'number of residual quantization levels',
        "codebook_size": 'codes per level',
        "shared_codebook": 'one codebook for all levels (original AniMind)',
        "activation": "'silu' | 'gelu' | 'relu'",
        "input_norm": "'standardize' | 'center' | 'none'",
        "codebook_update": "'ema' | 'gradient'",
        "estimator": "'ste' | 'rotation' (rotation trick, arXiv:2410.06424)",
        "beta": 'commitment loss weight',
        "ema_decay": 'EMA decay of codebook statistics',
        "ema_eps": 'EMA Laplace smoothing epsilon',
        "codebook_init": "'kmeans' (level by level) | 'random'",
        "kmeans_iters": 'k-means iterations (init and RQ-KMeans)',
        "kmeans_init_samples": 'rows used for k-means init (0 = all)',
        "restart_dead_codes": 're-seed codes unused over a window',
        "restart_window": 'steps per usage window for dead-code restarts',
        "restart_min_usage": 'min uses in a window to stay alive',
        "normalize_residuals": 'RQ-KMeans: L2-normalise residuals per level',
        "optimizer": "'adam' | 'adamw' | 'adagrad'",
        "lr": 'peak learning rate',
        "weight_decay": 'weight decay',
        "adam_betas": 'Adam/AdamW betas',
        "lr_schedule": "'cosine' | 'constant' (after warm-up)",
        "warmup_steps": 'linear warm-up optimizer steps',
        "min_lr_ratio": 'cosine floor as a fraction of lr',
        "batch_size": 'micro-batch size',
        "epochs": 'training epochs',
        "grad_accum_steps": 'micro-batches per optimizer step',
        "grad_clip": 'gradient norm clip (0 = off)',
        "amp": 'bf16 autocast on CUDA',
        "device": "'auto' | 'cpu' | 'cuda' | 'cuda:N'",
        "seed": 'random seed (split, init, batches, restarts)',
        "val_fraction": 'validation fraction of the items',
        "early_stopping_patience": 'epochs without improvement (0 = off)',
        "early_stopping_min_delta": 'minimum val-loss improvement',
        "stop_after_epochs": 'train at most N epochs in this run (resume later)',
        "full_eval_every": 'epochs between full-catalogue ID statistics',
        "num_threads": 'torch CPU threads (0 = default)',
        "dry_run_rows": 'rows used by a dry run',
        "dry_run_epochs": 'epochs of a dry run',
        "small_catalog": "fewer items than codebook_size: 'adapt' (fit max(2, N // 4) codes) | 'refuse'",
    },
)


class QuantizerOverrides(_QuantizerFields):
    """Every ``QuantizerConfig`` knob (derived from the library config); ``None`` keeps the preset's value."""

    def overrides(self) -> dict[str, Any]:
        """The knobs set in the launchpad: ``{field: value}`` for every non-``None`` library field."""
        return {k: getattr(self, k) for k in self.LIB_FIELDS if getattr(self, k) is not None}


def fit_metadata(fit: QuantizerFit) -> dict[str, Any]:
    """Dagster metadata of a ``QuantizerFit`` (numbers rounded, plots inline + markdown)."""
    res = fit.result
    md: dict[str, Any] = {**scalar_metadata(fit.headline), **scalar_metadata(fit.per_level)}
    md["min_perplexity"] = dg.MetadataValue.float(round(fit.min_perplexity, 2))
    md["checkpoint"] = dg.MetadataValue.path(str(res.checkpoints.get("best", "")))
    md["checkpoint_last"] = dg.MetadataValue.path(str(res.checkpoints.get("last", "")))
    md["config"] = dg.MetadataValue.json(res.config.to_dict())
    if fit.last_epochs.height:
        md["last_epochs"] = dg.MetadataValue.md(markdown_table(fit.last_epochs, max_rows=10))
    titles = {"loss_plot": "loss", "perplexity_plot": "perplexity", "usage_plot": "usage",
              "code_frequency_plot": "code frequency", "level_perplexity_plot": "perplexity per level"}
    for name, png in fit.plots.items():
        md[name] = image_md(png, titles.get(name, name))
    # small SVG versions that Dagster renders inline (markdown under 1,000 characters)
    hist = res.history
    if len(hist) >= 2:
        loss = {"train": [h["train_loss"] for h in hist]}
        if all("val_loss" in h for h in hist):
            loss["val"] = [h["val_loss"] for h in hist]
        small = svg_md(lines_svg(loss, logy=True), "loss", f"loss per epoch ({', '.join(loss)}; log scale)")
        if small is not None:
            md["loss_plot_inline"] = small
    ppl = {f"L{i + 1}": float(res.metrics[f"perplexity_l{i + 1}"]) for i in range(res.config.levels)}
    small = svg_md(bars_svg(ppl, ymax=float(res.config.codebook_size)), "perplexity per level",
                   f"perplexity per level of max {res.config.codebook_size}: " + ", ".join(f"{k} {v:.0f}" for k, v in list(ppl.items())[:8]))
    if small is not None:
        md["level_perplexity_plot_inline"] = small
    return md


def run_quantizer(
    context: dg.AssetExecutionContext,
    cfg: QuantizerConfig,
    anime_embeddings: pl.DataFrame,
    artifacts: ArtifactStoreResource,
    mlflow: MlflowResource,
    store_dir: str,
    run_name: str,
    resume: str = "",
    tags: dict[str, str] | None = None,
) -> tuple[QuantizerFit, dict[str, Any]]:
    """Train/resume a quantizer on the embedding frame; returns ``(fit, metadata)``."""
    ids, x = frame_vectors(anime_embeddings, "anime_id", "embedding", table="anime_embeddings")
    context.log.info(f"anime_embeddings: {len(ids)} vectors of dim {x.shape[1]}; quantizer {cfg.quantizer}")
    store = artifacts.store()
    ckpt_dir = store.path(*store_dir.split("/"))
    store.sweep(*store_dir.split("/"), log=context.log.info)  # temp files of killed runs
    with mlflow.start_run(context, tags=tags) as run:
        run.log_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in cfg.used_params().items()})

        def on_epoch(rec: dict) -> None:
            run.log_metrics({k: v for k, v in rec.items() if k not in ("epoch",)}, step=int(rec["epoch"]))

        fit = fit_quantizer(
            ids, x, cfg, checkpoint_dir=str(ckpt_dir), resume=resume or None,
            extra_payload=embedding_provenance(anime_embeddings), log=context.log.info, on_epoch=on_epoch,
        )
        run.log_metrics({f"final_{k}": v for k, v in fit.result.metrics.items() if isinstance(v, (int, float))})
        run_id = run.run_id
        run_link = run.link
    md = fit_metadata(fit)
    if run_id:
        md["mlflow_run_id"] = dg.MetadataValue.text(run_id)
        md["mlflow_run"] = dg.MetadataValue.url(run_link)
    context.log.info(
        f"{run_name}: unique {fit.result.metrics['unique_fraction']:.4f}, min perplexity {fit.min_perplexity:.1f}, "
        f"{fit.result.metrics.get('train_samples_per_s', 0):,.0f} samples/s, {fit.seconds:.1f}s"
    )
    return fit, md


def load_checkpoint(checkpoint: str, store) -> tuple[str, Any, dict]:
    """``(path, model, payload)`` of the quantizer checkpoint ``checkpoint`` ('' = ``<artifacts>/rqvae_model/model.pt``).
    Raises ``FileNotFoundError`` saying to materialize ``rqvae_model`` first."""
    from animind_assets.lib.semantic_ids.quantizers import load_quantizer

    ckpt = checkpoint or str(store.path(RQVAE_DIR, CHECKPOINT_NAME))
    try:
        model, payload = load_quantizer(ckpt)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}. Materialize rqvae_model first (or set config.checkpoint).") from exc
    return ckpt, model, payload


def encode_embeddings(model, payload: dict, ckpt: str, frame: pl.DataFrame, table: str):
    """``(ids (n,), vectors (n, dim) float32, codes (n, levels) int64, encode seconds)`` of an embedding frame
    (sorted by id). Raises ``ValueError`` naming ``table`` when the vector width differs from the checkpoint's."""
    import time

    from animind_assets.lib.semantic_ids.quantizers import encode_codes

    ids, x = frame_vectors(frame, "anime_id", "embedding", table=table)
    if x.shape[1] != int(payload["input_dim"]):
        raise ValueError(
            f"{table}.embedding has dim {x.shape[1]} but checkpoint {ckpt} expects {payload['input_dim']}; "
            "re-materialize rqvae_model on the current embeddings"
        )
    t0 = time.perf_counter()
    codes = encode_codes(model, x)
    return ids, x, codes, time.perf_counter() - t0

