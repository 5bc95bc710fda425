"""Shared Dagster-layer pieces of the semantic_ids group: the quantizer-fit overrides (launchpad
config) and ``run_quantizer`` (preset + overrides -> fit -> metadata), used by ``rqvae_model`` and
``rqvae_variants``."""

import json
import time
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import torch

from animind_assets.launchpad import derive_config

from animind_assets.lib.common.fingerprint import array_fingerprint
from animind_assets.lib.common.plots import bar_png, lines_png
from animind_assets.lib.semantic_ids.quantizers import QuantizerConfig, train_quantizer
from animind_assets.lib.semantic_ids.assign import frame_vectors
from animind_assets.meta import image_md, markdown_table, scalar_metadata
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
        "resume_changes": "resume with changed training settings: 'refuse' | 'record' (kept in config_changes)",
        "full_eval_every": 'epochs between full-catalogue ID statistics',
        "num_threads": 'torch CPU threads (0 = default)',
        "dry_run_rows": 'rows used by a dry run',
        "dry_run_epochs": 'epochs of a dry run',
    },
)


class QuantizerOverrides(_QuantizerFields):
    """Every ``QuantizerConfig`` knob (derived from the library config); ``None`` keeps the preset's value."""

    def overrides(self) -> dict[str, Any]:
        """The knobs set in the launchpad: ``{field: value}`` for every non-``None`` library field."""
        return {k: getattr(self, k) for k in self.LIB_FIELDS if getattr(self, k) is not None}



def embedding_provenance(df: pl.DataFrame) -> dict[str, str]:
    out = {}
    for col in ("model", "model_fingerprint", "dim"):
        if col in df.columns and df.height:
            vals = df[col].drop_nulls().unique().to_list()
            out[f"embedding_{col}"] = ",".join(str(v) for v in sorted(vals, key=str)[:3])
    return out


def history_plots(history: list[dict], levels: int) -> dict[str, dg.MetadataValue]:
    if len(history) < 2:
        return {}
    plots: dict[str, dg.MetadataValue] = {}
    loss = {"train": [h["train_loss"] for h in history]}
    if all("val_loss" in h for h in history):
        loss["val"] = [h["val_loss"] for h in history]
    plots["loss_plot"] = image_md(lines_png(loss, "loss (recon + beta * commit)", ylabel="loss", logy=True), "loss")
    ppl = {f"L{i + 1}": [h.get(f"train_perplexity_l{i + 1}", 0.0) for h in history] for i in range(min(levels, 8))}
    plots["perplexity_plot"] = image_md(lines_png(ppl, "code perplexity per level (train)", ylabel="perplexity"), "perplexity")
    usage = {f"L{i + 1}": [h.get(f"train_usage_l{i + 1}", 0.0) for h in history] for i in range(min(levels, 8))}
    plots["usage_plot"] = image_md(lines_png(usage, "codebook usage per level (train)", ylabel="fraction used"), "usage")
    return plots


def code_frequency_plot(codes: np.ndarray, codebook_size: int) -> dg.MetadataValue:
    series = {}
    for lv in range(min(codes.shape[1], 8)):
        counts = np.sort(np.bincount(codes[:, lv], minlength=codebook_size))[::-1]
        series[f"L{lv + 1}"] = counts.tolist()
    return image_md(lines_png(series, "items per code (sorted)", xlabel="code rank", ylabel="items", logy=True), "code frequency")


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
) -> tuple[Any, dict[str, Any]]:
    """Train/resume a quantizer on the embedding frame; returns ``(result, metadata)``."""
    t0 = time.perf_counter()
    ids, x = frame_vectors(anime_embeddings, "anime_id", "embedding", table="anime_embeddings")
    context.log.info(f"anime_embeddings: {len(ids)} vectors of dim {x.shape[1]}; quantizer {cfg.quantizer}")
    store = artifacts.store()
    ckpt_dir = store.path(*store_dir.split("/"))
    store.sweep(*store_dir.split("/"), log=context.log.info)  # temp files of killed runs
    n_used = min(len(ids), cfg.dry_run_rows) if cfg.dry_run else len(ids)
    extra = {
        "item_ids": torch.as_tensor(ids[:n_used]),
        "item_ids_fingerprint": array_fingerprint(ids[:n_used]),
        **embedding_provenance(anime_embeddings),
    }
    with mlflow.start_run(context, tags=tags) as run:
        run.log_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in cfg.used_params().items()})

        def on_epoch(rec: dict) -> None:
            run.log_metrics({k: v for k, v in rec.items() if k not in ("epoch",)}, step=int(rec["epoch"]))

        result = train_quantizer(
            x, cfg, log=context.log.info, on_epoch=on_epoch, checkpoint_dir=ckpt_dir, resume=resume or None, extra_payload=extra
        )
        run.log_metrics({f"final_{k}": v for k, v in result.metrics.items()})
        run_id = run.run_id
        run_link = run.link
    elapsed = time.perf_counter() - t0
    m = result.metrics
    levels = result.config.levels
    headline = {
        "quantizer": result.config.quantizer,
        "items": int(result.n_rows),
        "input_dim": int(x.shape[1]),
        "levels": levels,
        "codebook_size": result.config.codebook_size,
        "unique_fraction_before_disambiguation": m["unique_fraction"],
        "items_in_collisions": m["items_in_collisions"],
        "largest_collision_group": m["largest_collision_group"],
        "recon_loss": m["recon_loss"],
        "commit_loss": m["commit_loss"],
        "grad_norm": m.get("grad_norm"),
        "epochs_completed": m.get("epochs_completed"),
        "best_epoch": m.get("best_epoch"),
        "train_seconds": m.get("train_seconds"),
        "train_samples_per_s": m.get("train_samples_per_s"),
        "materialize_seconds": elapsed,
        "stopped_early": result.stopped_early,
        "finished": result.finished,
        "published": result.published,
        "dry_run": result.config.dry_run,
        "input_fingerprint": result.input_fingerprint,
    }
    per_level = {}
    for lv in range(levels):
        for key in ("usage", "perplexity", "residual_norm"):
            name = f"{key}_l{lv + 1}"
            if name in m:
                per_level[name] = m[name]
    md: dict[str, Any] = {**scalar_metadata(headline), **scalar_metadata(per_level)}
    md["min_perplexity"] = dg.MetadataValue.float(float(min(m[f"perplexity_l{i + 1}"] for i in range(levels))))
    md["checkpoint"] = dg.MetadataValue.path(str(result.checkpoints.get("best", "")))
    md["checkpoint_last"] = dg.MetadataValue.path(str(result.checkpoints.get("last", "")))
    md["config"] = dg.MetadataValue.json(result.config.to_dict())
    if run_id:
        md["mlflow_run_id"] = dg.MetadataValue.text(run_id)
        md["mlflow_run"] = dg.MetadataValue.url(run_link)
    if result.history:
        hist = pl.DataFrame([{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in result.history[-10:]])
        cols = [c for c in ("epoch", "train_loss", "val_loss", "train_perplexity_l1", "unique_fraction", "grad_norm", "lr", "restarted_codes") if c in hist.columns]
        md["last_epochs"] = dg.MetadataValue.md(markdown_table(hist.select(cols), max_rows=10))
    md.update(history_plots(result.history, levels))
    md["code_frequency_plot"] = code_frequency_plot(result.codes, result.config.codebook_size)
    md["level_perplexity_plot"] = image_md(
        bar_png({f"L{i + 1}": float(m[f"perplexity_l{i + 1}"]) for i in range(levels)},
                f"code perplexity per level (max {result.config.codebook_size})", "perplexity"),
        "perplexity per level",
    )
    if not result.finished:
        context.log.warning(
            f"{run_name}: training stopped after epoch {m.get('epochs_completed')} of {result.config.epochs} "
            f"(stop_after_epochs): model.pt NOT replaced; resume with resume='last' to finish and publish"
        )
    context.log.info(
        f"{run_name}: unique {m['unique_fraction']:.4f}, min perplexity {md['min_perplexity'].value:.1f}, "
        f"{m.get('train_samples_per_s', 0):,.0f} samples/s, {elapsed:.1f}s"
    )
    return result, md
