"""``train_quantizer``: fit a quantizer on item vectors and return per-item codes + metrics.

Training loop (RQ-VAE): seeded train/validation split; input normaliser fitted on the training
rows; codebooks initialised by k-means on the encoded residuals, level by level; optimizer
(Adam/AdamW/Adagrad) with linear warm-up then cosine decay (per optimizer step); gradient
accumulation; gradient clipping; bf16 autocast of the MLPs on CUDA; EMA/gradient codebook
updates and windowed dead-code restarts; per-epoch validation, best (lowest validation loss) and
last checkpoints written atomically; resume from ``last``/``best``/a path; early stopping.

Determinism on CPU: every random draw comes from a ``torch.Generator`` derived from
``cfg.seed`` and the epoch (batch order) or the global step (restarts), and every piece of state
(model buffers incl. EMA statistics and usage windows, optimizer, step counters, best/patience,
history) is in the checkpoint, so training N epochs straight gives the same weights as training
k epochs, resuming and training N-k more.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from animind_assets.lib.common.checkpoint import CheckpointError, config_diff, format_diff
from animind_assets.lib.common.device import resolve_device  # noqa: F401  (the one device rule; re-exported)
from animind_assets.lib.common.faults import crash_point
from animind_assets.lib.common.fingerprint import array_fingerprint
from animind_assets.lib.common.progress import Progress
from animind_assets.lib.common.schedules import progress_after_warmup, warmup_cosine
from animind_assets.lib.semantic_ids.quantizers.checkpoint import load_checkpoint, save_checkpoint
from animind_assets.lib.semantic_ids.quantizers.config import QuantizerConfig, small_catalog_codebook
from animind_assets.lib.semantic_ids.quantizers.metrics import code_stats, level_counts, perplexity_from_counts
from animind_assets.lib.semantic_ids.quantizers.model import RQVAE, ResidualKMeans, build_model, level_kmeans_args
from animind_assets.lib.common.storage import as_path

LogFn = Callable[[str], None]
EpochFn = Callable[[dict[str, Any]], None]

BEST_NAME = "model.pt"  # published: written once, when the training schedule has finished
LAST_NAME = "last.pt"  # resume point, rewritten after every epoch
STAGING_NAME = "best.staging.pt"  # best-so-far of a run in progress (never read by consumers)


@dataclass
class QuantizerResult:
    model: torch.nn.Module
    config: QuantizerConfig
    codes: np.ndarray  # (n_rows, levels) int64, from the best model
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    input_fingerprint: str = ""
    checkpoints: dict[str, str] = field(default_factory=dict)
    n_rows: int = 0
    epochs_run: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    samples_per_s: float = 0.0
    finished: bool = True  # the schedule ended (all epochs or early stopping); False after stop_after_epochs
    published: bool = False  # model.pt was (re)written by this call


def _noop(_: str) -> None:
    return None




def as_tensor(vectors) -> torch.Tensor:
    arr = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if not arr.flags.writeable:  # e.g. zero-copy views of polars/arrow buffers
        arr = arr.copy()
    x = torch.as_tensor(arr)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty 2-D array, got shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:5].tolist()
        raise ValueError(f"vectors contain non-finite values in {int(bad.sum())} rows (first row indices: {rows})")
    return x


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0 and n >= 4:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def lr_factor(step: int, cfg: QuantizerConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based): linear warm-up, then constant or
    cosine to ``min_lr_ratio`` at ``total_steps`` (``common.schedules.warmup_cosine``)."""
    progress = None if cfg.lr_schedule == "constant" else progress_after_warmup(step, cfg.warmup_steps, total_steps)
    return warmup_cosine(step, cfg.warmup_steps, progress, min_ratio=cfg.min_lr_ratio)


def make_optimizer(params, cfg: QuantizerConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def _ckpt_path(checkpoint_dir, name: str) -> str | None:
    return None if checkpoint_dir is None else str(as_path(checkpoint_dir) / name)


def resolve_resume(resume: str | None, checkpoint_dir) -> str | None:
    """``None``/"" -> no resume; "last"/"best" -> file in ``checkpoint_dir``; else a path."""
    if not resume:
        return None
    if resume in ("last", "best"):
        if checkpoint_dir is None:
            raise ValueError(f"resume={resume!r} needs a checkpoint_dir")
        return _ckpt_path(checkpoint_dir, LAST_NAME if resume == "last" else BEST_NAME)
    return str(resume)


def check_resume_config(payload: dict[str, Any], cfg: QuantizerConfig, path: str, log: LogFn = _noop) -> list[dict[str, Any]]:
    """Compare a checkpoint's config with the requested ``cfg`` before resuming (rule 6 of issue 12).

    * architecture / update-rule fields differ -> ``CheckpointError`` naming ``path`` and every differing
      field with both values (instead of a raw ``size mismatch`` from ``load_state_dict``);
    * training-setting fields differ -> ``CheckpointError`` unless ``cfg.resume_changes == "record"``;
      then the changes are returned as ``[{"epoch": e, "field": f, "checkpoint": a, "requested": b}]``
      (stored in the checkpoint's ``config_changes`` and logged), never adopted silently.
    Returns ``[]`` when nothing relevant changed."""
    from animind_assets.lib.semantic_ids.quantizers.config import ARCHITECTURE_FIELDS, TRAINING_FIELDS, UPDATE_RULE_FIELDS

    saved = dict(QuantizerConfig().to_dict(), **(payload.get("config") or {}))
    requested = cfg.to_dict()
    hard = config_diff(saved, requested, ARCHITECTURE_FIELDS + UPDATE_RULE_FIELDS)
    if hard:
        raise CheckpointError(
            f"cannot resume from {path}: the architecture / update rule differs from the checkpoint "
            f"({format_diff(hard)}). Start fresh (resume='') or resume with the checkpoint's values."
        )
    soft = config_diff(saved, requested, TRAINING_FIELDS)
    if not soft:
        return []
    if cfg.resume_changes != "record":
        raise CheckpointError(
            f"cannot resume from {path}: training settings differ from the checkpoint ({format_diff(soft)}). "
            "Resume with the checkpoint's values, start fresh, or set resume_changes='record' to adopt the new "
            "values from this epoch on (recorded in the checkpoint's config_changes)."
        )
    epoch = int(payload.get("epoch", 0))
    changes = [{"epoch": epoch, "field": k, "checkpoint": a, "requested": b} for k, (a, b) in soft.items()]
    log(f"resume from {path}: adopting changed training settings from epoch {epoch + 1} on ({format_diff(soft)})")
    return changes


def _final_metrics(model, x: torch.Tensor, cfg: QuantizerConfig) -> tuple[np.ndarray, dict[str, Any]]:
    ev = model.evaluate(x)
    codes = ev["codes"].cpu().numpy().astype(np.int64)
    m: dict[str, Any] = {
        "recon_loss": float(ev["recon"]),
        "commit_loss": float(ev["commit"]),
        "loss": float(ev["loss"]),
    }
    m.update(code_stats(codes, cfg.codebook_size))
    for i, v in enumerate(ev["residual_norms"]):
        m[f"residual_norm_l{i + 1}"] = float(v)
    return codes, m


def train_quantizer(
    vectors,
    cfg: QuantizerConfig,
    log: LogFn | None = None,
    on_epoch: EpochFn | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | None = None,
    extra_payload: dict[str, Any] | None = None,
) -> QuantizerResult:
    """Fit ``cfg.quantizer`` on ``vectors`` (``(n, d)`` float array, one row per item).

    ``log`` receives progress lines; ``on_epoch`` receives each epoch's metric dict (``epoch``,
    ``train_loss``, ``val_loss``, ``usage_l1``, ``perplexity_l1``, ``unique_fraction``, ``lr``,
    ``grad_norm``, ...). With ``checkpoint_dir`` set, ``model.pt`` (best) and ``last.pt`` are
    written there atomically; ``resume`` is ``"last"``, ``"best"`` or a checkpoint path.
    ``extra_payload`` (plain values) is stored in every checkpoint (e.g. the item-id fingerprint).
    Returns a ``QuantizerResult`` whose ``codes`` (from the best model) follow the row order of
    ``vectors`` (truncated to ``cfg.dry_run_rows`` rows in dry-run mode).

    Fewer rows than ``cfg.codebook_size`` (issue 12 rule 9): ``cfg.small_catalog="adapt"`` fits
    ``max(2, n // 4)`` codes per level (``result.config.codebook_size``; the request is kept in
    ``metrics["requested_codebook_size"]``), ``"refuse"`` raises ``ValueError("N items <
    codebook_size K ...")``.
    """
    log = log or _noop
    cfg = cfg.validate().effective()
    if cfg.num_threads > 0:
        torch.set_num_threads(int(cfg.num_threads))
    x_all = as_tensor(vectors)
    if cfg.dry_run:
        x_all = x_all[: max(2, cfg.dry_run_rows)]
        log(f"dry run: {x_all.shape[0]} rows, {cfg.epochs} epoch(s)")
    fingerprint = array_fingerprint(x_all.numpy())
    n, d = x_all.shape
    requested_k = int(cfg.codebook_size)
    k_fit, note = small_catalog_codebook(n, requested_k, cfg.small_catalog)
    if note:
        log(note)
        cfg = cfg.replace(codebook_size=k_fit)
    result = _train(x_all, cfg, log, on_epoch, checkpoint_dir, resume, extra_payload, fingerprint)
    result.metrics["requested_codebook_size"] = requested_k
    return result


def _train(x_all, cfg, log, on_epoch, checkpoint_dir, resume, extra_payload, fingerprint) -> QuantizerResult:
    n, d = x_all.shape
    extra = dict(extra_payload or {})
    torch.manual_seed(cfg.seed)

    if cfg.quantizer == "rqkmeans":
        return _fit_rqkmeans(x_all, cfg, log, on_epoch, checkpoint_dir, fingerprint, extra)

    device = resolve_device(cfg.device)
    train_idx, val_idx = split_indices(n, cfg.val_fraction, cfg.seed)
    x_train, x_val = x_all[train_idx].to(device), x_all[val_idx].to(device)
    x_dev = x_all.to(device)
    n_train = x_train.shape[0]
    model: RQVAE = build_model(d, cfg).to(device)  # type: ignore[assignment]
    steps_per_epoch = math.ceil(math.ceil(n_train / cfg.batch_size) / cfg.grad_accum_steps)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    amp = bool(cfg.amp and device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else None

    state = {"epoch": 0, "global_step": 0, "best_val": math.inf, "best_epoch": 0, "bad_epochs": 0, "history": [], "config_changes": []}
    resume_path = resolve_resume(resume, checkpoint_dir)
    if resume_path:
        payload = load_checkpoint(resume_path, map_location=device)
        if payload.get("kind") != "rqvae":
            raise ValueError(f"cannot resume RQ-VAE training from a {payload.get('kind')!r} checkpoint: {resume_path}")
        if payload.get("input_fingerprint") != fingerprint:
            raise ValueError(
                f"checkpoint {resume_path} was trained on different input vectors "
                f"(fingerprint {payload.get('input_fingerprint')} != {fingerprint}); start fresh instead of resuming"
            )
        config_changes = check_resume_config(payload, cfg, resume_path, log)
        model.load_state_dict(payload["model_state"])
        if payload.get("optimizer_state") is not None:
            optimizer.load_state_dict(payload["optimizer_state"])
        for k in ("epoch", "global_step", "best_epoch", "bad_epochs"):
            state[k] = int(payload[k])
        state["best_val"] = float(payload["best_val"])
        state["history"] = list(payload.get("history", []))
        state["config_changes"] = list(payload.get("config_changes", [])) + config_changes
        if config_changes:
            # the schedule may have changed (lr, epochs): the optimizer's param groups follow cfg
            for group in optimizer.param_groups:
                group["weight_decay"] = cfg.weight_decay
                if "betas" in group:
                    group["betas"] = tuple(cfg.adam_betas)
        log(f"resumed from {resume_path} at epoch {state['epoch']} (step {state['global_step']})")
    else:
        model.normalizer.fit(x_train)
        if cfg.codebook_init == "kmeans":
            t0 = time.perf_counter()
            sample = x_train
            if cfg.kmeans_init_samples and n_train > cfg.kmeans_init_samples:
                pick = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.kmeans_init_samples]
                sample = x_train[pick.to(device)]
            with torch.no_grad():
                z = model.encode(sample).float().cpu()
            model.quantizer.init_kmeans(
                z, iters=cfg.kmeans_iters, seed=cfg.seed, log=log, first_level=level_kmeans_args(cfg, 0, cfg.kmeans_iters)
            )
            model.to(device)
            log(f"k-means codebook init on {z.shape[0]} encoded rows in {time.perf_counter() - t0:.1f}s")

    def payload_for(which: str, finished: bool, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            **extra,
            "kind": "rqvae",
            "which": which,
            "input_dim": d,
            "config": cfg.to_dict(),
            "model_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer_state": optimizer.state_dict(),
            "epoch": state["epoch"],
            "global_step": state["global_step"],
            "best_val": float(state["best_val"]),
            "best_epoch": state["best_epoch"],
            "bad_epochs": state["bad_epochs"],
            "finished": finished,
            "history": state["history"],
            "config_changes": state["config_changes"],
            "input_fingerprint": fingerprint,
            "metrics": metrics,
        }

    best_state: dict[str, torch.Tensor] | None = None
    # While training, the best-so-far goes to the staging file; model.pt is published only at the end
    # of the schedule (rule 5 of issue 12: a killed run never replaces the finished model).
    best_path, last_path = _ckpt_path(checkpoint_dir, BEST_NAME), _ckpt_path(checkpoint_dir, LAST_NAME)
    staging_path = _ckpt_path(checkpoint_dir, STAGING_NAME)
    if state["epoch"] > 0:
        for candidate in (staging_path, best_path):
            if candidate and as_path(candidate).exists():
                best_state = load_checkpoint(candidate, map_location=device)["model_state"]
                break

    stopped_early = False
    epochs_this_call = 0
    train_seconds = 0.0
    samples_seen = 0
    progress = Progress("rqvae train", total=max(0, cfg.epochs - state["epoch"]), unit="epochs", log=log, every_s=0)
    model.train()
    while state["epoch"] < cfg.epochs:
        if cfg.stop_after_epochs and epochs_this_call >= cfg.stop_after_epochs:
            break
        epoch = state["epoch"] + 1
        t_epoch = time.perf_counter()
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)).to(device)
        sums = {"loss": 0.0, "recon": 0.0, "commit": 0.0, "codebook": 0.0}
        usage = [np.zeros(cfg.codebook_size, dtype=np.int64) for _ in range(cfg.levels)]
        grad_norms: list[float] = []
        restarts = 0
        micro = 0
        optimizer.zero_grad(set_to_none=True)
        batches = list(range(0, n_train, cfg.batch_size))
        for bi, s in enumerate(batches):
            idx = perm[s : s + cfg.batch_size]
            xb = x_train[idx]
            losses, q = model(xb, autocast=autocast)
            (losses["loss"] / cfg.grad_accum_steps).backward()
            model.quantizer.after_forward(q)
            w = xb.shape[0] / n_train
            for k in sums:
                sums[k] += float(losses[k].detach()) * w
            codes_np = q.codes.cpu().numpy()
            for lv in range(cfg.levels):
                usage[lv] += np.bincount(codes_np[:, lv], minlength=cfg.codebook_size)
            micro += 1
            if micro == cfg.grad_accum_steps or bi == len(batches) - 1:
                params = [p for p in model.parameters() if p.grad is not None]
                if cfg.grad_clip > 0:
                    gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                else:
                    gn = torch.norm(torch.stack([p.grad.detach().norm() for p in params])) if params else torch.zeros(())
                grad_norms.append(float(gn))
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * lr_factor(state["global_step"], cfg, total_steps)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["global_step"])
                restarts += model.quantizer.end_step(q, gen)
                state["global_step"] += 1
                micro = 0
        train_time = time.perf_counter() - t_epoch
        train_seconds += train_time
        samples_seen += n_train
        state["epoch"] = epoch
        epochs_this_call += 1

        record: dict[str, Any] = {
            "epoch": epoch,
            "step": state["global_step"],
            "lr": float(optimizer.param_groups[0]["lr"]),
            "train_loss": sums["loss"],
            "train_recon": sums["recon"],
            "train_commit": sums["commit"],
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
            "restarted_codes": restarts,
            "train_samples_per_s": n_train / max(train_time, 1e-9),
        }
        if cfg.codebook_update == "gradient":
            record["train_codebook_loss"] = sums["codebook"]
        for lv in range(cfg.levels):
            record[f"train_usage_l{lv + 1}"] = float((usage[lv] > 0).mean())
            record[f"train_perplexity_l{lv + 1}"] = perplexity_from_counts(usage[lv])
        if x_val.shape[0]:
            ev = model.evaluate(x_val)
            record.update(val_loss=float(ev["loss"]), val_recon=float(ev["recon"]), val_commit=float(ev["commit"]))
            score = record["val_loss"]
        else:
            score = record["train_loss"]
        if cfg.full_eval_every and (epoch % cfg.full_eval_every == 0 or epoch == cfg.epochs):
            ev_all = model.evaluate(x_dev)
            stats = code_stats(ev_all["codes"].cpu().numpy(), cfg.codebook_size)
            record.update({k: v for k, v in stats.items()})
            for i, v in enumerate(ev_all["residual_norms"]):
                record[f"residual_norm_l{i + 1}"] = float(v)
        record["epoch_seconds"] = time.perf_counter() - t_epoch
        state["history"].append(record)

        improved = score < state["best_val"] - cfg.early_stopping_min_delta
        if improved:
            state["best_val"] = float(score)
            state["best_epoch"] = epoch
            state["bad_epochs"] = 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if staging_path:
                save_checkpoint(payload_for("best", False, record), staging_path)
        else:
            state["bad_epochs"] += 1
        if cfg.early_stopping_patience and state["bad_epochs"] >= cfg.early_stopping_patience:
            stopped_early = True
        if last_path:
            save_checkpoint(payload_for("last", stopped_early or epoch == cfg.epochs, record), last_path)
        crash_point(f"rqvae_epoch:{epoch}")  # fault tests: SIGKILL here when $ANIMIND_CRASH_AT matches
        if on_epoch:
            on_epoch(dict(record))
        extra_msg = (
            f"loss {record['train_loss']:.4f} val {record.get('val_loss', float('nan')):.4f} "
            f"ppl_l1 {record['train_perplexity_l1']:.0f} unique {record.get('unique_fraction', float('nan')):.4f}"
        )
        progress.update(1, extra=extra_msg)
        if stopped_early:
            log(f"early stopping at epoch {epoch}: no val improvement for {state['bad_epochs']} epochs")
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    codes, metrics = _final_metrics(model, x_dev, cfg)
    metrics.update(
        best_epoch=state["best_epoch"],
        epochs_completed=state["epoch"],
        train_seconds=train_seconds,
        train_samples_per_s=samples_seen / train_seconds if train_seconds > 0 else 0.0,
        grad_norm=state["history"][-1]["grad_norm"] if state["history"] else 0.0,
        restarted_codes_total=int(sum(int(cb.restarts_total) for cb in model.quantizer.codebooks)),
    )
    if state["history"] and "val_loss" in state["history"][-1]:
        best_rec = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), state["history"][-1])
        metrics["val_loss"] = float(best_rec.get("val_loss", math.nan))
        metrics["val_recon"] = float(best_rec.get("val_recon", math.nan))
    finished = stopped_early or state["epoch"] >= cfg.epochs
    checkpoints: dict[str, str] = {}
    published = False
    if best_path:
        # the best model with its final metrics: published as model.pt when the schedule has finished,
        # else kept in the staging file for the next resume (model.pt keeps the last finished model)
        cur = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        p = payload_for("best", finished, metrics)
        p["model_state"] = cur
        if finished:
            save_checkpoint(p, best_path)
            published = True
            if staging_path and as_path(staging_path).exists():
                as_path(staging_path).unlink()
            checkpoints = {"best": best_path, "last": last_path or ""}
        else:
            save_checkpoint(p, staging_path)
            checkpoints = {"best": staging_path or "", "last": last_path or ""}
            log(
                f"stopped after epoch {state['epoch']} of {cfg.epochs} (stop_after_epochs={cfg.stop_after_epochs}): "
                f"NOT published; best-so-far kept in {staging_path}, resume with resume='last'"
                + (f"; {best_path} still holds the previous finished model" if as_path(best_path).exists() else "")
            )
    return QuantizerResult(
        model=model,
        config=cfg,
        codes=codes,
        metrics=metrics,
        history=state["history"],
        input_fingerprint=fingerprint,
        checkpoints=checkpoints,
        n_rows=n,
        epochs_run=epochs_this_call,
        stopped_early=stopped_early,
        train_seconds=train_seconds,
        samples_per_s=metrics["train_samples_per_s"],
        finished=finished,
        published=published,
    )


def _fit_rqkmeans(x_all, cfg, log, on_epoch, checkpoint_dir, fingerprint, extra) -> QuantizerResult:
    n, d = x_all.shape
    model = ResidualKMeans(d, cfg)
    t0 = time.perf_counter()
    model.fit(x_all, iters=cfg.kmeans_iters, seed=cfg.seed, log=log)
    secs = time.perf_counter() - t0
    codes, metrics = _final_metrics(model, x_all, cfg)
    metrics.update(train_seconds=secs, train_samples_per_s=n / secs if secs > 0 else 0.0, epochs_completed=1, grad_norm=0.0)
    record = {"epoch": 1, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    if on_epoch:
        on_epoch(dict(record))
    checkpoints: dict[str, str] = {}
    if checkpoint_dir is not None:
        payload = {
            **extra,
            "kind": "rqkmeans",
            "input_dim": d,
            "config": cfg.to_dict(),
            "model_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer_state": None,
            "epoch": 1,
            "global_step": 0,
            "best_val": float(metrics["recon_loss"]),
            "best_epoch": 1,
            "bad_epochs": 0,
            "finished": True,
            "history": [record],
            "input_fingerprint": fingerprint,
            "metrics": metrics,
        }
        best, last = _ckpt_path(checkpoint_dir, BEST_NAME), _ckpt_path(checkpoint_dir, LAST_NAME)
        save_checkpoint({**payload, "which": "best"}, best)
        save_checkpoint({**payload, "which": "last"}, last)
        checkpoints = {"best": best, "last": last}
    log(f"RQ-KMeans fitted on {n} rows in {secs:.1f}s: unique {metrics['unique_fraction']:.4f}")
    return QuantizerResult(
        model=model,
        config=cfg,
        codes=codes,
        metrics=metrics,
        history=[record],
        input_fingerprint=fingerprint,
        checkpoints=checkpoints,
        n_rows=n,
        epochs_run=1,
        train_seconds=secs,
        samples_per_s=metrics["train_samples_per_s"],
        finished=True,
        published=checkpoint_dir is not None,
    )


def encode_codes(model: torch.nn.Module, vectors, batch_size: int = 8192) -> np.ndarray:
    """Codes ``(n, levels)`` for ``vectors`` with a trained/loaded quantizer."""
    x = as_tensor(vectors)
    dev = next((b.device for b in model.buffers()), torch.device("cpu"))
    return model.codes(x.to(dev), batch_size=batch_size).cpu().numpy().astype(np.int64)


def level_usage_counts(codes: np.ndarray, codebook_size: int) -> list[np.ndarray]:
    return [level_counts(codes, lv, codebook_size) for lv in range(np.asarray(codes).shape[1])]
