"""Fit a quantizer on an item-embedding frame and summarise the fit (no Dagster).

``fit_quantizer`` is what the ``rqvae_model`` / ``rqvae_variants`` assets run: it trains (or
resumes) ``train_quantizer`` with the item ids and embedding provenance stored in the checkpoint,
records the fit-time reference used by the stable-ID policy (``stable.fit_reference``: fit-time
reconstruction error, per-level code distributions, code fingerprint, requested config) in the
best checkpoint, and returns a ``QuantizerFit`` with the figures the Dagster layer shows: headline
numbers, per-level statistics, the last epochs and PNG plots (bytes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

from animind_assets.lib.common.fingerprint import array_fingerprint
from animind_assets.lib.common.plots import bar_png, lines_png
from animind_assets.lib.semantic_ids.quantizers import QuantizerConfig, QuantizerResult, load_checkpoint, save_checkpoint, train_quantizer
from animind_assets.lib.semantic_ids.stable import fit_reference, model_fingerprint

LogFn = Callable[[str], None]

#: columns of ``QuantizerFit.last_epochs`` (when present in the history)
EPOCH_COLUMNS = ("epoch", "train_loss", "val_loss", "train_perplexity_l1", "unique_fraction", "grad_norm", "lr", "restarted_codes")


def embedding_provenance(df: pl.DataFrame) -> dict[str, str]:
    """``embedding_model`` / ``embedding_model_fingerprint`` / ``embedding_dim`` of an embedding frame
    (up to 3 distinct values each, comma-joined) for the checkpoint payload."""
    out = {}
    for col in ("model", "model_fingerprint", "dim"):
        if col in df.columns and df.height:
            vals = df[col].drop_nulls().unique().to_list()
            out[f"embedding_{col}"] = ",".join(str(v) for v in sorted(vals, key=str)[:3])
    return out


@dataclass
class QuantizerFit:
    """One quantizer fit and its summary.

    ``headline``: plain numbers (items, levels, codebook size, unique fraction, losses, timings,
    ...); ``per_level``: ``usage_l{i}``, ``perplexity_l{i}``, ``residual_norm_l{i}``;
    ``last_epochs``: up to 10 history rows (``EPOCH_COLUMNS``); ``plots``: name -> PNG bytes;
    ``quantizer_fingerprint``: ``stable.model_fingerprint`` of the fitted model (the identity
    ``semantic_ids`` keys its ID registry on).
    """

    result: QuantizerResult
    headline: dict[str, Any]
    per_level: dict[str, float]
    last_epochs: pl.DataFrame
    plots: dict[str, bytes] = field(default_factory=dict)
    seconds: float = 0.0
    quantizer_fingerprint: str = ""

    @property
    def min_perplexity(self) -> float:
        lv = self.result.config.levels
        return float(min(self.result.metrics[f"perplexity_l{i + 1}"] for i in range(lv)))


def history_plots(history: list[dict], levels: int) -> dict[str, bytes]:
    """Loss, per-level perplexity and usage over epochs (PNG bytes); ``{}`` for < 2 epochs."""
    if len(history) < 2:
        return {}
    loss = {"train": [h["train_loss"] for h in history]}
    if all("val_loss" in h for h in history):
        loss["val"] = [h["val_loss"] for h in history]
    out = {"loss_plot": lines_png(loss, "loss (recon + beta * commit)", ylabel="loss", logy=True)}
    ppl = {f"L{i + 1}": [h.get(f"train_perplexity_l{i + 1}", 0.0) for h in history] for i in range(min(levels, 8))}
    out["perplexity_plot"] = lines_png(ppl, "code perplexity per level (train)", ylabel="perplexity")
    usage = {f"L{i + 1}": [h.get(f"train_usage_l{i + 1}", 0.0) for h in history] for i in range(min(levels, 8))}
    out["usage_plot"] = lines_png(usage, "codebook usage per level (train)", ylabel="fraction used")
    return out


def code_frequency_png(codes: np.ndarray, codebook_size: int) -> bytes:
    """Items per code, codes sorted by frequency, one line per level (log y)."""
    series = {}
    for lv in range(min(codes.shape[1], 8)):
        counts = np.sort(np.bincount(codes[:, lv], minlength=codebook_size))[::-1]
        series[f"L{lv + 1}"] = counts.tolist()
    return lines_png(series, "items per code (sorted)", xlabel="code rank", ylabel="items", logy=True)


def record_fit_reference(checkpoint: str, result: QuantizerResult, requested_config: Mapping[str, Any]) -> str:
    """Add ``fit_reference`` (``stable.fit_reference``) to the checkpoint at ``checkpoint`` (atomic
    rewrite). Returns the ``model_fingerprint`` of the stored model."""
    payload = load_checkpoint(checkpoint)
    payload["fit_reference"] = fit_reference(
        result.codes, float(result.metrics["recon_loss"]), int(result.config.codebook_size), requested_config
    )
    save_checkpoint(payload, checkpoint)
    return model_fingerprint(payload["model_state"])


def fit_quantizer(
    ids: np.ndarray,
    x: np.ndarray,
    cfg: QuantizerConfig,
    *,
    checkpoint_dir: str | None = None,
    resume: str | None = None,
    extra_payload: Mapping[str, Any] | None = None,
    log: LogFn | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> QuantizerFit:
    """Train ``cfg`` on ``x`` (``(n, d)`` float32, rows in the order of ``ids``, ``(n,)`` int64).

    Stores ``item_ids`` (the rows used), their fingerprint and ``extra_payload`` in every
    checkpoint; after a finished fit with ``checkpoint_dir`` set, adds the stable-ID fit reference
    to ``<checkpoint_dir>/model.pt``. Errors from ``train_quantizer`` propagate (``ValueError`` for
    bad configs, vectors, resume mismatches or a refused small catalog).
    """
    t0 = time.perf_counter()
    requested = cfg.to_dict()
    n_used = min(len(ids), cfg.dry_run_rows) if cfg.dry_run else len(ids)
    extra = {
        "item_ids": torch.as_tensor(np.asarray(ids[:n_used], dtype=np.int64)),
        "item_ids_fingerprint": array_fingerprint(np.asarray(ids[:n_used])),
        **dict(extra_payload or {}),
    }
    result = train_quantizer(x, cfg, log=log, on_epoch=on_epoch, checkpoint_dir=checkpoint_dir, resume=resume or None, extra_payload=extra)
    fp = ""
    best = result.checkpoints.get("best")
    if best and result.finished and result.published:  # model.pt is (re)written only when the schedule ended
        fp = record_fit_reference(best, result, requested)
    else:
        fp = model_fingerprint(result.model.state_dict())
    elapsed = time.perf_counter() - t0
    m = result.metrics
    levels = result.config.levels
    headline = {
        "quantizer": result.config.quantizer,
        "items": int(result.n_rows),
        "input_dim": int(x.shape[1]),
        "levels": levels,
        "codebook_size": result.config.codebook_size,
        "requested_codebook_size": m.get("requested_codebook_size", result.config.codebook_size),
        "unique_fraction_before_disambiguation": m["unique_fraction"],
        "items_in_collisions": m["items_in_collisions"],
        "largest_collision_group": m["largest_collision_group"],
        "recon_loss": m["recon_loss"],
        "commit_loss": m["commit_loss"],
        "grad_norm": m.get("grad_norm") if result.config.quantizer == "rqvae" else None,
        "epochs_completed": m.get("epochs_completed") if result.config.quantizer == "rqvae" else None,
        "best_epoch": m.get("best_epoch"),
        "train_seconds": m.get("train_seconds"),
        "train_samples_per_s": m.get("train_samples_per_s"),
        "fit_seconds": elapsed,
        "stopped_early": result.stopped_early if result.config.quantizer == "rqvae" else None,
        "finished": result.finished,
        "published": result.published,
        "dry_run": result.config.dry_run,
        "input_fingerprint": result.input_fingerprint,
        "quantizer_fingerprint": fp,
    }
    per_level = {}
    for lv in range(levels):
        for key in ("usage", "perplexity", "residual_norm"):
            name = f"{key}_l{lv + 1}"
            if name in m:
                per_level[name] = float(m[name])
    if result.history:
        hist = pl.DataFrame([{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in result.history[-10:]])
        last = hist.select([c for c in EPOCH_COLUMNS if c in hist.columns])
    else:
        last = pl.DataFrame()
    plots = history_plots(result.history, levels)
    plots["code_frequency_plot"] = code_frequency_png(result.codes, result.config.codebook_size)
    plots["level_perplexity_plot"] = bar_png(
        {f"L{i + 1}": float(m[f"perplexity_l{i + 1}"]) for i in range(levels)},
        f"code perplexity per level (max {result.config.codebook_size})",
        "perplexity",
    )
    return QuantizerFit(result, headline, per_level, last, plots, elapsed, fp)
