"""Shared training loop for next-item sequence models (SASRec, RPG) on a leave-one-out split.

Every model is a ``NextItemModel`` (``torch.nn.Module``) working on **item tokens** ``item_id + 1``
(``0`` = padding), left-padded to the batch's longest sequence (at most ``max_len``):

* ``loss(inputs, targets) -> scalar``: ``inputs``/``targets`` (B, L) int64; ``targets[b, t]`` is the
  token of the item following ``inputs[b, :t+1]`` (0 = no target). Every position of every training
  sequence predicts the next item ("all prefixes", the standard SASRec training).
* ``score(inputs) -> (B, n_items)`` float: scores of every item (by item id) as the next item after the
  last position.

Training data: per user, ``seq[:-2]`` (never the validation or test item): inputs ``seq[:-3]``,
targets ``seq[1:-2]``, both cut to the last ``max_len`` positions. Early stopping on **validation
NDCG@10 with seen items masked** (``evaluation.evaluate_scorer`` on a fixed, seeded user subset), or with
``early_stop_metric="nll"`` on the validation items' negative log-likelihood under the model's softmax
(``evaluation.heldout_nll``; for a model used as a distillation teacher); the best weights are restored at
the end. Speed is reported as training targets (positions) per second.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from animind_assets.lib.common.progress import Progress, fmt_seconds
from animind_assets.lib.common.schedules import progress_after_warmup, warmup_cosine
from animind_assets.lib.common.storage import atomic_dir, local_copy
from animind_assets.lib.retrieval.evaluation import SequenceSplit, evaluate_scorer, heldout_nll

LogFn = Callable[[str], None]
EARLY_STOP_METRICS = ("ndcg@10", "nll")


def _noop(_: str) -> None:
    return None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class SeqTrainConfig:
    """Optimisation and early-stopping knobs shared by SASRec and RPG."""

    max_len: int = 50  # positions (most recent items) fed to the model
    batch_size: int = 128  # users (sequences) per step
    lr: float = 1e-3  # Adam learning rate (peak, after warm-up)
    lr_schedule: str = "constant"  # constant | cosine (decay to 0 over ``epochs`` epochs after warm-up)
    weight_decay: float = 0.0  # Adam(W) weight decay
    betas: tuple[float, float] = (0.9, 0.98)  # Adam betas
    warmup_steps: int = 0  # linear warm-up steps
    grad_clip: float = 0.0  # 0 = off
    epochs: int = 200  # maximum epochs
    eval_every: int = 1  # epochs between validations
    patience: int = 10  # validations without gain of early_stop_metric before stopping; 0 = off
    early_stop_metric: str = "ndcg@10"  # ndcg@10 (masked, higher is better) | nll (validation item NLL, lower is better)
    val_users: int = 0  # validation users (fixed seeded subset); 0 = all
    max_train_seconds: float = 0.0  # wall-clock budget (checked after each validation and step); 0 = none
    length_buckets: int = 20  # batches per sorted-by-length bucket (less padding); 0 = plain shuffle
    seed: int = 42  # seed of init, batches and the validation subset
    num_threads: int = 2  # torch.set_num_threads; 0 = leave as is
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 512  # users per scoring batch (validation/test)

    def validate(self) -> SeqTrainConfig:
        for name in ("max_len", "batch_size", "epochs", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SeqTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"SeqTrainConfig.lr must be > 0, got {self.lr}")
        if self.early_stop_metric not in EARLY_STOP_METRICS:
            raise ValueError(f"SeqTrainConfig.early_stop_metric must be one of {EARLY_STOP_METRICS}, got {self.early_stop_metric!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"SeqTrainConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeqTrainConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw).validate()


def lr_factor(cfg: SeqTrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at optimizer step ``s`` (0-based): linear warm-up over ``warmup_steps``,
    then 1.0 (``constant``) or a half cosine from 1 to 0 at ``total_steps`` (``cosine``, as in RPG's
    reference training; Loshchilov & Hutter, SGDR, ICLR 2017). ``total_steps`` is the planned number of
    steps (``epochs`` x steps per epoch), so stopping earlier on a time budget leaves the LR above 0."""
    cosine = cfg.lr_schedule == "cosine"

    def factor(s: int) -> float:
        progress = progress_after_warmup(s, cfg.warmup_steps, total_steps) if cosine else None
        return warmup_cosine(s, cfg.warmup_steps, progress)

    return factor


# ------------------------------------------------------------------------------------------- batches
def pad_left(seqs: Sequence[np.ndarray], max_len: int, offset: int = 1) -> torch.Tensor:
    """Item-id arrays -> (B, L) int64 tokens ``id + offset``, left-padded with 0, ``L = min(max_len,
    longest)``; longer sequences keep their last ``max_len`` items."""
    width = max(1, min(max_len, max((len(s) for s in seqs), default=1)))
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = np.asarray(s[-width:], dtype=np.int64)
        if len(s):
            out[r, width - len(s):] = s + offset
    return torch.from_numpy(out)


def training_pairs(split: SequenceSplit, max_len: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per user with >= 2 training items: (inputs ``seq[:-3]``, targets ``seq[1:-2]``), last
    ``max_len`` positions. Users with a single training item give no pair."""
    inputs, targets = [], []
    for t in split.train:
        if len(t) < 2:
            continue
        inputs.append(t[:-1][-max_len:])
        targets.append(t[1:][-max_len:])
    return inputs, targets


def epoch_batches(lengths: np.ndarray, batch_size: int, epoch: int, seed: int, bucket_batches: int = 50) -> list[np.ndarray]:
    """Deterministic batches for one epoch: shuffle; with ``bucket_batches > 0`` sort by length within
    buckets of that many batches (less padding), then shuffle the batch order."""
    rng = np.random.default_rng(seed * 1_000_003 + epoch)
    perm = rng.permutation(len(lengths))
    if bucket_batches <= 0:
        return [perm[i: i + batch_size] for i in range(0, len(perm), batch_size)]
    bucket = bucket_batches * batch_size
    batches: list[np.ndarray] = []
    for start in range(0, len(perm), bucket):
        chunk = perm[start: start + bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


# ------------------------------------------------------------------------------------------- scoring
def make_scorer(model: torch.nn.Module, max_len: int, device: torch.device | None = None) -> Callable[[list[np.ndarray]], torch.Tensor]:
    """``histories -> (B, n_items)`` scores on CPU float32, for ``evaluation.evaluate_scorer``."""
    device = device or next(model.parameters()).device

    @torch.no_grad()
    def score(histories: list[np.ndarray]) -> torch.Tensor:
        was = model.training
        model.eval()
        out = model.score(pad_left(histories, max_len).to(device)).float().cpu()
        model.train(was)
        return out

    return score


# ------------------------------------------------------------------------------------------- training
@dataclass
class SeqTrainResult:
    """What ``train_sequence_model`` returns: the model with the best validation weights loaded,
    one record per validation (``history``), the best record, why it stopped, and speed."""

    model: torch.nn.Module
    history: list[dict[str, float]]
    best: dict[str, float]
    stop_reason: str
    epochs: int
    steps: int
    train_seconds: float
    positions_per_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def train_sequence_model(
    model: torch.nn.Module,
    split: SequenceSplit,
    cfg: SeqTrainConfig,
    name: str = "model",
    log: LogFn | None = None,
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> SeqTrainResult:
    """Train ``model`` (a ``NextItemModel``) on every prefix of the training sequences with Adam,
    validate every ``eval_every`` epochs (masked NDCG@10 on ``val_users`` users; with
    ``early_stop_metric="nll"`` also the validation items' NLL in nats, ``history[i]["val_nll"]``), stop after
    ``patience`` validations without gain of ``early_stop_metric``, ``epochs`` or ``max_train_seconds``; restore
    the best weights (by that metric).
    Raises ``ValueError`` when no user has two training items or the loss becomes non-finite."""
    log = log or _noop
    cfg.validate()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    inputs, targets = training_pairs(split, cfg.max_len)
    if not inputs:
        raise ValueError("no user has >= 2 training items (seq[:-2]); nothing to train on")
    lengths = np.array([len(x) for x in inputs])
    n_positions = int(lengths.sum())
    val_rows = split.subset(cfg.val_users, seed=cfg.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(inputs) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, cfg.epochs * steps_per_epoch))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {len(inputs)} training sequences, {n_positions} target positions/epoch, {steps_per_epoch} steps/epoch, "
        f"{n_params:,} parameters, validation on {len(val_rows)} users, device {device}")

    history: list[dict[str, float]] = []
    by_nll = cfg.early_stop_metric == "nll"
    key = "val_nll" if by_nll else "val_ndcg@10"
    best_metric, best_state, best_rec, bad = (math.inf if by_nll else -1.0), None, {}, 0
    step, epoch, stop_reason = 0, 0, ""
    t0 = time.perf_counter()
    train_time = 0.0
    positions_done = 0
    progress = Progress(f"{name} train", total=cfg.epochs * steps_per_epoch, unit="steps", log=log, every_s=60.0,
                        budget_s=cfg.max_train_seconds)
    scorer = make_scorer(model, cfg.max_len, device)
    model.train()
    while epoch < cfg.epochs:
        te = time.perf_counter()
        running, n_run = 0.0, 0
        for idx in epoch_batches(lengths, cfg.batch_size, epoch, cfg.seed, cfg.length_buckets):
            inp = pad_left([inputs[i] for i in idx], cfg.max_len).to(device)
            tgt = pad_left([targets[i] for i in idx], cfg.max_len).to(device)
            loss = model.loss(inp, tgt)
            if not torch.isfinite(loss):
                raise ValueError(f"{name}: non-finite loss {float(loss)} at step {step} (lower lr?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            running += float(loss.detach())
            n_run += 1
            positions_done += int(lengths[idx].sum())
            progress.update(1, extra=f"loss {running / n_run:.4f}")
        epoch += 1
        train_time += time.perf_counter() - te
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            res = evaluate_scorer(scorer, split, stage="valid", model=name, rows=val_rows, modes=("masked",),
                                  batch_size=cfg.eval_batch_size, n_boot=0)
            m = res.metrics["masked"]
            rec = {"epoch": float(epoch), "step": float(step), "train_loss": running / max(1, n_run),
                   **{f"val_{k}": v for k, v in m.items()}, "elapsed_s": time.perf_counter() - t0,
                   "positions_per_s": positions_done / max(1e-9, train_time)}
            if by_nll:
                rec["val_nll"] = heldout_nll(scorer, split, "valid", val_rows, cfg.eval_batch_size)
            improved = rec[key] < best_metric if by_nll else rec[key] > best_metric
            if improved:
                best_metric, best_rec, bad = rec[key], dict(rec), 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                bad += 1
            rec["best_" + key] = best_metric
            history.append(rec)
            nll = f" NLL {rec['val_nll']:.4f}" if by_nll else ""
            log(f"{name} epoch {epoch}: loss {rec['train_loss']:.4f}, val R@10 {rec['val_recall@10']:.4f} "
                f"N@10 {rec['val_ndcg@10']:.4f}{nll} (best {key[4:]} {best_metric:.4f} @ epoch {int(best_rec['epoch'])}), "
                f"{rec['positions_per_s']:,.0f} positions/s, elapsed {fmt_seconds(rec['elapsed_s'])}")
            if on_eval:
                on_eval(rec)
            if cfg.patience and bad >= cfg.patience:
                stop_reason = f"early stopping: no val {'NLL' if by_nll else 'NDCG@10'} gain in {cfg.patience} validations"
                break
        if cfg.max_train_seconds and time.perf_counter() - t0 >= cfg.max_train_seconds:
            stop_reason = f"time budget {cfg.max_train_seconds:.0f}s reached"
            break
    if not stop_reason:
        stop_reason = f"{cfg.epochs} epochs done"
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    total = time.perf_counter() - t0
    log(f"{name}: stopped ({stop_reason}) after {epoch} epochs / {step} steps in {fmt_seconds(total)}; "
        f"best val {key[4:]} {best_metric:.4f} @ epoch {int(best_rec.get('epoch', 0))}")
    return SeqTrainResult(model, history, best_rec, stop_reason, epoch, step, total,
                          positions_done / max(1e-9, train_time),
                          {"train_sequences": len(inputs), "positions_per_epoch": n_positions, "val_users": len(val_rows),
                           "parameters": n_params, "device": str(device)})


# ------------------------------------------------------------------------------------------- blocks
class CausalBlock(torch.nn.Module):
    """Pre-LayerNorm causal self-attention block (SASRec / GPT-2 style).

    ``x`` (B, L, d) -> (B, L, d): ``x + drop(MHA(LN(x)))`` then ``x + drop(FFN(LN(x)))``; attention is
    causal (position t sees positions <= t); ``attn_dropout`` on attention weights, ``resid_dropout`` on
    both residual branches and inside the FFN."""

    def __init__(self, d: int, heads: int, d_ff: int, attn_dropout: float, resid_dropout: float, activation: str = "gelu") -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"hidden size {d} is not divisible by {heads} heads")
        self.ln1 = torch.nn.LayerNorm(d, eps=1e-8)
        self.attn = torch.nn.MultiheadAttention(d, heads, dropout=attn_dropout, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(d, eps=1e-8)
        act = {"gelu": torch.nn.GELU(), "relu": torch.nn.ReLU()}[activation]
        self.ff = torch.nn.Sequential(torch.nn.Linear(d, d_ff), act, torch.nn.Dropout(resid_dropout), torch.nn.Linear(d_ff, d))
        self.drop = torch.nn.Dropout(resid_dropout)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, attn_mask=causal, need_weights=False)
        x = x + self.drop(a)
        return x + self.drop(self.ff(self.ln2(x)))


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """(L, L) bool, True above the diagonal (= not allowed to attend)."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)


def padded_causal_mask(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention mask for left-padded ``tokens`` (B, L) int64 (0 = padding) -> (B * heads, L, L) bool,
    True = not allowed to attend (``torch.nn.MultiheadAttention``'s 3-D ``attn_mask``).

    Position t attends to positions <= t that are **not padding**, so a sequence's hidden states do
    not depend on how much padding its batch needs (without this, scores changed with the batch: the
    longest history in an evaluation batch decided how many padding keys every user attended to).
    Padding rows attend only to themselves (no fully masked row, hence no NaN); their outputs are
    zeroed by the models."""
    b, length = tokens.shape
    mask = causal_mask(length, tokens.device).unsqueeze(0) | (tokens == 0).unsqueeze(1)  # (B, L, L)
    mask = mask & ~torch.eye(length, dtype=torch.bool, device=tokens.device).unsqueeze(0)
    return mask.repeat_interleave(heads, dim=0)


class ModelConfigMixin:
    """``to_dict`` / ``from_dict`` for model configs that hold a ``train: SeqTrainConfig`` (SASRec, RPG)."""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "train"}
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}).validate()


def write_model_folder(state: dict[str, Any], conf: dict[str, Any], dest: str, extra: dict[str, Any] | None = None) -> str:
    """Atomic model folder: ``weights.pt`` (a state dict), ``config.json`` and optional ``extra.json``."""
    with atomic_dir(dest) as tmp:
        torch.save(state, tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps(conf, indent=2), encoding="utf-8")
        if extra:
            (tmp / "extra.json").write_text(json.dumps(extra, indent=2, default=str), encoding="utf-8")
    return dest


def read_model_folder(src: str, map_location: str = "cpu") -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(state, conf, extra)`` of a folder written by ``write_model_folder``; ``torch.load(weights_only=True)``."""
    with local_copy(src) as local:
        local = Path(local)
        conf = json.loads((local / "config.json").read_text(encoding="utf-8"))
        state = torch.load(local / "weights.pt", map_location=map_location, weights_only=True)
        extra_p = local / "extra.json"
        extra = json.loads(extra_p.read_text(encoding="utf-8")) if extra_p.exists() else {}
    return state, conf, extra
