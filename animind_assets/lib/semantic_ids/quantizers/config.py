"""Quantizer configuration (plain dataclass, JSON/checkpoint friendly) and named presets.

``QuantizerConfig`` holds every knob of both quantizers (RQ-VAE and residual k-means) and of the
trainer. It round-trips through ``to_dict`` / ``from_dict`` with plain Python types only, so it can
live inside a ``torch.load(weights_only=True)`` checkpoint and in MLflow params.

Presets (``PRESETS`` / ``preset_config(name, **overrides)``):

* ``default`` (the dataclass defaults): residual k-means, 3 levels x 256 codes, on centred
  L2-normalised inputs with L2-normalised residuals; level 1 seeded by kNN-constrained Ward
  clustering (keeps near-duplicate items together), levels 2-3 by k-means++ + Lloyd. On MAL 2020
  with MiniLM vectors: 96% unique IDs before disambiguation, perplexity >= 200 per level,
  co-watch recall@20 0.85 x the embedding-cosine ceiling, ~40 s on 2 CPU cores.
* ``rqkmeans``: the same with k-means++ seeding at level 1 (plain RQ-KMeans baseline).
* ``rqvae``: TIGER-like RQ-VAE for ~384-d sentence embeddings: MLP 384 -> 256 -> 128 -> 32, 3
  levels x 256 codes, per-level codebooks initialised by k-means on the encoded residuals (level 1
  Ward-seeded), EMA codebook updates, dead-code restarts over a 50-step usage window, AdamW +
  cosine LR. Its 32-d latent keeps fewer close neighbourhoods than the raw vectors, so its co-watch
  recall is lower on MAL 2020 (see the benchmark).
* ``conservative`` / ``aggressive``: the original AniMind tokenizer's ``rqvae_conservative`` /
  ``rqvae_aggressive`` hyper-parameters (8 levels x 2048 codes in one shared codebook, latent 256,
  hidden 1024, Adam(0.5, 0.9), lr 2.5e-5 / 6e-5, beta 0.20 / 0.35, EMA decay 0.995 / 0.98, batch
  192 / 320, 60 / 30 epochs, warm-up 3000 / 800 steps) run on this library's machinery (k-means
  codebook init, windowed dead-code restarts, cosine decay after the warm-up).

The RQ-VAE knobs (``hidden_dims``, ``latent_dim``, ``codebook_update``, ...) keep TIGER-like
defaults, so ``preset_config("default", quantizer="rqvae")`` equals the ``rqvae`` preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

QUANTIZERS = ("rqvae", "rqkmeans")
CODEBOOK_UPDATES = ("ema", "gradient")
ESTIMATORS = ("ste", "rotation")
OPTIMIZERS = ("adam", "adamw", "adagrad")
INPUT_NORMS = ("standardize", "center", "none")
ACTIVATIONS = ("silu", "gelu", "relu")
LR_SCHEDULES = ("cosine", "constant")
RESUME_CHANGES = ("refuse", "record")

# Resume compatibility (rule 6 of issue 12). A checkpoint can only be resumed with the same
# architecture and update rule (else the weights mean something else: refused, naming the fields);
# a change of training settings is refused unless ``resume_changes="record"``, in which case it is
# adopted from the resume epoch on and recorded in the checkpoint's ``config_changes``. Fields not
# listed (device, threads, amp, stop_after_epochs, evaluation cadence, init-only knobs, dry-run caps)
# do not affect the continuation and may change freely.
ARCHITECTURE_FIELDS = (
    "quantizer", "hidden_dims", "decoder_hidden_dims", "latent_dim", "levels", "codebook_size",
    "shared_codebook", "activation", "input_norm",
)
UPDATE_RULE_FIELDS = (
    "codebook_update", "estimator", "optimizer", "beta", "ema_decay", "ema_eps",
    "restart_dead_codes", "restart_window", "restart_min_usage",
)
TRAINING_FIELDS = (
    "lr", "weight_decay", "adam_betas", "lr_schedule", "warmup_steps", "min_lr_ratio", "batch_size", "epochs",
    "grad_accum_steps", "grad_clip", "seed", "val_fraction", "early_stopping_patience", "early_stopping_min_delta",
)


@dataclass
class QuantizerConfig:
    # --- which quantizer -------------------------------------------------------------------------
    quantizer: str = "rqkmeans"  # "rqkmeans" (residual k-means) | "rqvae" (MLP auto-encoder + residual VQ)
    # --- architecture ----------------------------------------------------------------------------
    hidden_dims: list[int] = field(default_factory=lambda: [256, 128])  # encoder MLP widths
    decoder_hidden_dims: list[int] | None = None  # None: mirror of hidden_dims
    latent_dim: int = 32
    levels: int = 3
    codebook_size: int = 256
    shared_codebook: bool = False  # one codebook for every level (the original AniMind layout)
    activation: str = "silu"
    input_norm: str = "standardize"  # per-dimension z-score with training-set statistics
    # --- codebook learning -----------------------------------------------------------------------
    codebook_update: str = "ema"  # "ema" (default) | "gradient" (codebook loss + optimizer)
    estimator: str = "ste"  # encoder gradient through the quantizer: "ste" | "rotation" (2410.06424)
    beta: float = 0.25  # commitment weight
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    codebook_init: str = "kmeans"  # "kmeans" (level by level on encoded residuals) | "random"
    first_level_init: str = "ward"  # level-1 seeds: "ward" (kNN-constrained Ward) | "kmeans++"
    first_level_iters: int = 0  # Lloyd iterations after Ward seeding of level 1 (0 = Ward means as is)
    ward_neighbors: int = 10  # k of the kNN connectivity graph of the Ward clustering
    ward_max_rows: int = 50_000  # Ward runs on a seeded sample above this many rows
    kmeans_iters: int = 10
    kmeans_init_samples: int = 0  # 0 = every training row
    restart_dead_codes: bool = True
    restart_window: int = 50  # steps over which code usage is counted before deciding
    restart_min_usage: float = 1.0  # codes used fewer times than this in a full window restart
    # --- residual k-means (quantizer == "rqkmeans") -------------------------------------------------
    normalize_residuals: bool = True  # L2-normalise the residual before each level's k-means
    # --- training --------------------------------------------------------------------------------
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: str = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    batch_size: int = 512
    epochs: int = 25
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # 0 = off
    amp: bool = True  # bf16 autocast of the MLPs, CUDA only
    device: str = "auto"
    seed: int = 42
    val_fraction: float = 0.05
    early_stopping_patience: int = 0  # epochs without val improvement; 0 = off
    early_stopping_min_delta: float = 0.0
    stop_after_epochs: int = 0  # train at most this many epochs in this call (schedule still spans `epochs`)
    resume_changes: str = "refuse"  # resume with changed training settings (lr, batch_size, epochs, ...): "refuse" | "record"
    full_eval_every: int = 1  # epochs between full-catalogue code passes (unique-ID fraction); 0 = end only
    num_threads: int = 0  # torch CPU threads; 0 = leave as is
    small_catalog: str = "adapt"  # fewer items than codebook_size: "adapt" (fit max(2, N // 4) codes) | "refuse"
    dry_run: bool = False
    dry_run_rows: int = 512
    dry_run_epochs: int = 1

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> QuantizerConfig:
        def check(name: str, value: Any, allowed: tuple) -> None:
            if value not in allowed:
                raise ValueError(f"QuantizerConfig.{name}={value!r}; expected one of {allowed}")

        check("quantizer", self.quantizer, QUANTIZERS)
        check("codebook_update", self.codebook_update, CODEBOOK_UPDATES)
        check("estimator", self.estimator, ESTIMATORS)
        check("optimizer", self.optimizer, OPTIMIZERS)
        check("input_norm", self.input_norm, INPUT_NORMS)
        check("activation", self.activation, ACTIVATIONS)
        check("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check("codebook_init", self.codebook_init, ("kmeans", "random"))
        check("first_level_init", self.first_level_init, ("ward", "kmeans++"))
        check("resume_changes", self.resume_changes, RESUME_CHANGES)
        check("small_catalog", self.small_catalog, ("adapt", "refuse"))
        for name in ("latent_dim", "levels", "codebook_size", "batch_size", "epochs", "grad_accum_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"QuantizerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"QuantizerConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"QuantizerConfig.ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.restart_window < 1:
            raise ValueError("QuantizerConfig.restart_window must be >= 1")
        if len(self.adam_betas) != 2:
            raise ValueError("QuantizerConfig.adam_betas needs two values")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantizerConfig fields: {unknown}")
        return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}).validate()

    def replace(self, **overrides: Any) -> QuantizerConfig:
        data = self.to_dict()
        data.update(overrides)
        return QuantizerConfig.from_dict(data)

    def used_params(self) -> dict[str, Any]:
        """The fields the configured fit actually reads, ``{name: value}`` (for experiment tracking).

        Residual k-means (``quantizer="rqkmeans"``) reads only ``RQKMEANS_FIELDS``; the RQ-VAE reads every
        field but ``normalize_residuals``. Either way, knobs of an unused branch are left out: the Ward
        knobs unless ``first_level_init == "ward"``, EMA knobs unless ``codebook_update == "ema"``,
        k-means-init knobs unless ``codebook_init == "kmeans"``, dead-code restart knobs unless
        ``restart_dead_codes``, ``adam_betas`` with Adagrad, dry-run knobs unless ``dry_run``.
        """
        data = self.to_dict()
        if self.quantizer == "rqkmeans":
            keep = set(RQKMEANS_FIELDS)
        else:
            keep = set(data) - {"normalize_residuals"}
            if self.codebook_update != "ema":
                keep -= {"ema_decay", "ema_eps"}
            if self.codebook_init != "kmeans":
                keep -= {"kmeans_iters", "kmeans_init_samples", "first_level_init", *WARD_FIELDS}
            if not self.restart_dead_codes:
                keep -= {"restart_window", "restart_min_usage"}
            if self.optimizer == "adagrad":
                keep -= {"adam_betas"}
            if not self.early_stopping_patience:
                keep -= {"early_stopping_min_delta"}
            if self.decoder_hidden_dims is None:
                keep -= {"decoder_hidden_dims"}
        if self.first_level_init != "ward":
            keep -= set(WARD_FIELDS)
        if not self.dry_run:
            keep -= {"dry_run_rows", "dry_run_epochs"}
        return {k: v for k, v in data.items() if k in keep}

    def effective(self) -> QuantizerConfig:
        """The configuration actually trained (dry-run caps applied)."""
        if not self.dry_run:
            return self
        return self.replace(epochs=min(self.epochs, self.dry_run_epochs), stop_after_epochs=0)


def small_catalog_codebook(n_items: int, codebook_size: int, mode: str = "adapt") -> tuple[int, str]:
    """Codebook size to fit with ``n_items`` items; ``(size, note)``.

    A level cannot use more codes than there are items, and with ``n_items <= codebook_size`` every
    item becomes its own level-1 centroid, so deeper levels see only zero residuals. ``mode="adapt"``
    fits ``max(2, n_items // 4)`` codes per level instead (about 4 items per level-1 code);
    ``mode="refuse"`` raises ``ValueError("N items < codebook_size K ...")``. ``note`` is ``""``
    when nothing had to change.
    """
    n, k = int(n_items), int(codebook_size)
    if n >= k:
        return k, ""
    if mode == "refuse":
        raise ValueError(
            f"{n} items < codebook_size {k}: a level cannot use more codes than there are items; "
            f"lower codebook_size (e.g. {max(2, n // 4)}) or set small_catalog='adapt'"
        )
    if mode != "adapt":
        raise ValueError(f"small_catalog={mode!r}; expected 'adapt' or 'refuse'")
    adapted = max(2, n // 4)
    return adapted, f"{n} items < codebook_size {k}: fitting codebook_size {adapted} (about 4 items per code)"


#: the only fields residual k-means reads (``used_params``); everything else is RQ-VAE training
RQKMEANS_FIELDS = (
    "quantizer", "levels", "codebook_size", "normalize_residuals", "first_level_init", "first_level_iters",
    "ward_neighbors", "ward_max_rows", "kmeans_iters", "seed", "num_threads", "dry_run", "dry_run_rows",
)
#: level-1 Ward seeding knobs (read only when ``first_level_init == "ward"``)
WARD_FIELDS = ("first_level_iters", "ward_neighbors", "ward_max_rows")

_ORIGINAL_COMMON: dict[str, Any] = dict(
    quantizer="rqvae",
    hidden_dims=[1024],
    latent_dim=256,
    levels=8,
    codebook_size=2048,
    shared_codebook=True,
    activation="gelu",
    input_norm="none",
    codebook_update="ema",
    estimator="ste",
    ema_eps=1e-5,
    optimizer="adam",
    adam_betas=[0.5, 0.9],
    weight_decay=0.0,
    grad_clip=0.0,
    val_fraction=0.05,
    full_eval_every=10,
    first_level_init="kmeans++",
    kmeans_iters=10,
)

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "rqkmeans": dict(quantizer="rqkmeans", first_level_init="kmeans++"),
    "rqvae": dict(quantizer="rqvae"),
    "conservative": dict(
        _ORIGINAL_COMMON,
        lr=2.5e-5,
        beta=0.20,
        ema_decay=0.995,
        batch_size=192,
        epochs=60,
        warmup_steps=3000,
    ),
    "aggressive": dict(
        _ORIGINAL_COMMON,
        lr=6e-5,
        beta=0.35,
        ema_decay=0.98,
        batch_size=320,
        epochs=30,
        warmup_steps=800,
    ),
}


def preset_config(name: str = "default", **overrides: Any) -> QuantizerConfig:
    """``QuantizerConfig`` for a named preset, with field overrides applied on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown quantizer preset {name!r}; known: {sorted(PRESETS)}")
    data = QuantizerConfig().to_dict()
    data.update(PRESETS[name])
    data.update(overrides)
    return QuantizerConfig.from_dict(data)
