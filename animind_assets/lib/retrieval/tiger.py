"""TIGER-style generative retrieval (Rajput et al., NeurIPS 2023) on semantic IDs, domain-generic.

An encoder-decoder transformer (Hugging Face T5 with a small config) reads the semantic IDs of a user's
last ``max_history`` items and generates the next item's semantic ID token by token. At inference, beam
search is constrained to the trie of valid IDs (``animind_assets.lib.semantic_ids.trie.SidTrie``), so every
generated ID is a real item.

Public API::

    codec = SidCodec.from_mapping({item_id: (c1, c2, c3, c4), ...})
    split = leave_one_out(sequences, max_history=20)        # train prefixes / valid / test
    result = train_tiger(split, codec, TigerConfig(), checkpoint_dir="store/tiger/ckpt", log=print)
    metrics = evaluate(result.model, codec, split.test, ks=(5, 10), beams=20)
    pop = popularity_metrics(split, ks=(5, 10))

Vocabulary: ``0`` pad (also T5's decoder start), ``1`` EOS, then one block of tokens per ID level
(level ``l`` code ``c`` -> ``offset[l] + c``), then optional hashed user tokens (``user_buckets``).
Targets are the item's ``L`` level tokens followed by EOS.

Split (leave-one-out, standard for Amazon Beauty): per user, the last item is the test target (history =
everything before it), the second-to-last the validation target, and training uses every prefix of the
rest (target ``seq[t]`` from history ``seq[:t]``, ``1 <= t < n - 2``). Histories keep the last
``max_history`` items.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from animind_assets.lib.common.progress import Progress, fmt_seconds
from animind_assets.lib.common.schedules import progress_after_warmup, warmup_cosine
from animind_assets.lib.common.checkpoint import load_payload, save_payload
from animind_assets.lib.common.device import cpu_bf16_warning, resolve_device  # noqa: F401  (resolve_device: the one device rule; re-exported)
from animind_assets.lib.common.storage import atomic_dir, local_copy
from animind_assets.lib.retrieval.reporting import (  # noqa: F401  (public API of the TIGER module)
    REPORT_METRICS,
    TIGER_CF_BEAUTY,
    TIGER_PAPER_BEAUTY,
    comparison_bar_png,
    metrics_table,
)
from animind_assets.lib.retrieval.tiger_data import (  # noqa: F401
    EOS_ID,
    N_SPECIAL,
    PAD_ID,
    Examples,
    LogFn,
    LooSplit,
    SidCodec,
    encode_batch,
    epoch_batches,
    leave_one_out,
    load_reference_index,
    noop_log,
)
from animind_assets.lib.retrieval.tiger_generate import (  # noqa: F401
    evaluate,
    generate_rankings,
    popularity_metrics,
    popularity_rankings,
)

# ---------------------------------------------------------------------------------------- config
@dataclass
class TigerConfig:
    # model (TIGER's Beauty config: 4+4 layers, d_model 128, 6 heads of 64, ff 1024, dropout 0.1)
    d_model: int = 128
    d_kv: int = 64
    num_heads: int = 6
    d_ff: int = 1024
    num_layers: int = 4
    num_decoder_layers: int = 4
    dropout: float = 0.1
    relative_attention_num_buckets: int = 32
    feed_forward_proj: str = "relu"
    # data
    max_history: int = 20
    user_buckets: int = 0  # TIGER hashes users into 2000 tokens; 0 = no user token
    max_train_examples: int = 0  # 0 = every training prefix; >0 = a fixed random subset (bounded runs)
    # optimisation
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 300
    lr_schedule: str = "inverse_sqrt"  # "inverse_sqrt" | "cosine" | "constant" | "cosine_time" (cosine to 5% at max_train_seconds)
    grad_clip: float = 1.0
    epochs: int = 50
    max_steps: int = 0  # 0 = no step cap
    max_train_seconds: float = 0.0  # 0 = no time cap (training stops at the next evaluation past it)
    # evaluation during training / early stopping
    eval_every_steps: int = 0  # 0 = once per epoch
    val_users: int = 2000  # validation users scored at each evaluation (0 = all)
    val_beams: int = 20
    exclude_history: bool = True  # items already in the history are never recommended (validation and test)
    patience: int = 4  # evaluations without improvement of select_metric; 0 = off
    min_delta: float = 0.0
    select_metric: str = "ndcg@10"  # validation metric for checkpoint selection / early stopping: ndcg@10 | recall@10
    # runtime
    seed: int = 42
    num_threads: int = 2  # torch.set_num_threads; 0 = leave as is
    device: str = "auto"  # "auto" (cuda when available) | "cpu" | "cuda" | "cuda:1" ...
    bf16: bool = False  # bf16 autocast for the training forward pass: for CUDA or a CPU with AMX-BF16 (0.81-0.88x float32 with AVX512-BF16 only; a warning is logged)
    length_buckets: int = 50  # batches per sorted-by-length bucket (less padding)

    def validate(self) -> TigerConfig:
        if self.lr_schedule not in ("inverse_sqrt", "cosine", "constant", "cosine_time"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; expected inverse_sqrt | cosine | constant | cosine_time")
        if self.lr_schedule == "cosine_time" and self.max_train_seconds <= 0:
            raise ValueError("lr_schedule='cosine_time' decays over the wall-clock budget: set max_train_seconds > 0")
        for name in ("d_model", "d_kv", "num_heads", "d_ff", "num_layers", "num_decoder_layers", "batch_size", "max_history", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TigerConfig.{name} must be >= 1")
        if self.select_metric not in ("ndcg@10", "recall@10"):
            raise ValueError(f"select_metric={self.select_metric!r}; expected ndcg@10 | recall@10")
        if self.val_beams < 10:
            raise ValueError("val_beams must be >= 10 (validation Recall@10 needs 10 beams)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TigerConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}).validate()




def build_model(codec: SidCodec, cfg: TigerConfig):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5Config(
        vocab_size=codec.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        num_heads=cfg.num_heads,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        dropout_rate=cfg.dropout,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        feed_forward_proj=cfg.feed_forward_proj,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        bos_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    model = T5ForConditionalGeneration(t5)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.decoder_start_token_id = PAD_ID
    return model


def n_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def lr_factor(step: int, cfg: TigerConfig, total_steps: int, time_frac: float = 0.0) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step``: linear warm-up over ``warmup_steps``, then
    ``inverse_sqrt`` (T5/TIGER), ``cosine`` to 5 % at ``total_steps``, ``constant``, or ``cosine_time``:
    cosine to 5 % as ``time_frac`` (elapsed / ``max_train_seconds``) goes 0 -> 1, so a wall-clock budget
    ends at the low LR whatever the machine's speed (budget-aware schedule; Li et al., "Budgeted
    Training", ICLR 2020, with time instead of iterations as the budget)."""
    warm = max(1, cfg.warmup_steps)
    if step >= warm and cfg.lr_schedule == "inverse_sqrt":
        return math.sqrt(warm / (step + 1))
    progress = {"cosine": progress_after_warmup(step, warm, total_steps), "cosine_time": time_frac}.get(cfg.lr_schedule)
    return warmup_cosine(step, warm, progress, min_ratio=0.05)


# -------------------------------------------------------------------------------------- training
@dataclass
class TigerTrainResult:
    model: Any
    history: list[dict[str, float]]
    best: dict[str, float]
    stop_reason: str
    steps: int
    epochs_completed: float
    train_seconds: float
    resumed_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_coverage(split: LooSplit, codec: SidCodec) -> None:
    """Every item of the split (histories and targets) must have a semantic ID."""
    items: set[int] = set()
    for ex in (split.train, split.valid, split.test):
        items.update(int(x) for x in ex.targets.tolist())
        for h in ex.histories:
            items.update(int(x) for x in h.tolist())
    missing = sorted(i for i in items if not codec.has(i))
    if missing:
        raise ValueError(f"{len(missing)} items of the interactions have no semantic ID, e.g. item_id {missing[:5]}")


def _ckpt(checkpoint_dir: str | None, name: str) -> str | None:
    return None if checkpoint_dir is None else f"{str(checkpoint_dir).rstrip('/')}/{name}"


def save_checkpoint(payload: dict[str, Any], dest: str) -> str:
    """Atomic plain-type save (``lib.common.checkpoint.save_payload``)."""
    save_payload(payload, dest)
    return dest


def load_checkpoint(src: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` via ``lib.common.checkpoint.load_payload``: a checkpoint holding
    anything but tensors and plain values (e.g. a planted pickle reducer) raises ``CheckpointError``
    naming the file, and none of its code runs."""
    return load_payload(src, map_location=map_location)


def _exists(path: str | None) -> bool:
    if path is None:
        return False
    from animind_assets.lib.common.storage import as_path

    return as_path(path).exists()


def train_step(model, batch: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer, device: torch.device,
               bf16: bool = False, grad_clip: float = 1.0) -> torch.Tensor:
    """One teacher-forced TIGER update: forward (bf16 autocast when ``bf16``), backward, gradient clipping to
    ``grad_clip`` (0 = off), ``opt.step()``, gradients cleared. ``batch`` = ``encode_batch`` tensors on ``device``
    (``input_ids`` / ``attention_mask`` (B, L) int64, ``labels`` (B, T) int64). Returns the detached scalar loss.
    The learning-rate schedule is the caller's."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def train_tiger(
    split: LooSplit,
    codec: SidCodec,
    cfg: TigerConfig,
    checkpoint_dir: str | None = None,
    resume: bool = True,
    log: LogFn | None = None,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    fingerprint: str = "",
) -> TigerTrainResult:
    """Train with teacher forcing on every training prefix; evaluate validation Recall@10 (constrained
    beam search on ``val_users`` users) every ``eval_every_steps`` steps (or epoch); checkpoint
    ``last.pt`` (atomic) after every evaluation and ``best.pt`` on improvement; early stopping with
    ``patience``; ``max_train_seconds``/``max_steps`` bound the run. With ``resume`` and a ``last.pt``
    whose fingerprint matches, training continues from it (same batches, optimizer and best so far)."""
    log = log or noop_log
    cfg.validate()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    check_coverage(split, codec)

    train = split.train
    if cfg.max_train_examples and len(train) > cfg.max_train_examples:
        rng = np.random.default_rng(cfg.seed)
        train = train.subset(np.sort(rng.choice(len(train), cfg.max_train_examples, replace=False)))
    if len(train) == 0:
        raise ValueError(
            f"tiger: nothing left to train on: the split has 0 training examples ({split.stats()}; users with "
            "fewer than 3 items are skipped by leave-one-out)"
        )
    lengths = np.array([len(h) for h in train.histories])
    valid = split.valid
    if cfg.val_users and len(valid) > cfg.val_users:
        rng = np.random.default_rng(cfg.seed + 1)
        valid = valid.subset(np.sort(rng.choice(len(valid), cfg.val_users, replace=False)))
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    eval_every = cfg.eval_every_steps or steps_per_epoch

    device = resolve_device(cfg.device)
    bf16_warning = cpu_bf16_warning(cfg.bf16, device)
    if bf16_warning:
        log(f"warning: tiger: {bf16_warning}")
    model = build_model(codec, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    clock: dict[str, float] = {}  # "t0" once training starts: the budget share for lr_schedule="cosine_time"

    def factor(step: int) -> float:
        frac = (time.perf_counter() - clock["t0"]) / cfg.max_train_seconds if "t0" in clock and cfg.max_train_seconds else 0.0
        return lr_factor(step, cfg, total_steps, frac)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    trie = codec.trie()

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_metric": -1.0, "best_step": 0, "bad_evals": 0, "history": [], "train_seconds": 0.0}
    resumed_from = None
    last_path, best_path = _ckpt(checkpoint_dir, "last.pt"), _ckpt(checkpoint_dir, "best.pt")
    if resume and _exists(last_path):
        payload = load_checkpoint(last_path)
        if payload.get("fingerprint") == fingerprint and payload.get("vocab_size") == codec.vocab_size:
            model.load_state_dict(payload["model"])
            opt.load_state_dict(payload["optimizer"])
            sched.load_state_dict(payload["scheduler"])
            state.update(payload["state"])
            resumed_from = last_path
            log(f"tiger: resumed from {last_path} at step {state['step']} (epoch {state['epoch']}, best val recall@10 {state['best_metric']:.4f})")
            if payload.get("finished"):
                log("tiger: checkpoint says training had finished; loading best weights")
                best = load_checkpoint(best_path) if _exists(best_path) else payload
                model.load_state_dict(best["model"])
                return TigerTrainResult(
                    model, state["history"], _best_record(state), payload.get("stop_reason", "finished"), state["step"],
                    state["step"] / steps_per_epoch, state["train_seconds"], resumed_from,
                )
        else:
            log(f"tiger: ignoring {last_path}: written for other data/config (fingerprint differs)")

    log(
        f"tiger: {len(train)} training examples ({steps_per_epoch} steps/epoch, batch {cfg.batch_size}), "
        f"{n_parameters(model):,} parameters, vocab {codec.vocab_size}, validation on {len(valid)} users, device {device}"
    )
    t_start = time.perf_counter() - state["train_seconds"]
    clock["t0"] = t_start
    stop_reason = ""
    running, running_n = 0.0, 0
    progress = Progress("tiger train", total=total_steps, unit="steps", log=log, every_s=30.0,
                        budget_s=cfg.max_train_seconds - state["train_seconds"] if cfg.max_train_seconds else None)
    progress.done = state["step"]

    def do_eval() -> bool:
        nonlocal running, running_n
        model.eval()
        m = evaluate(model, codec, valid, ks=(5, 10), beams=cfg.val_beams, constrained=True, exclude_history=cfg.exclude_history)
        model.train()
        rec = {
            "step": float(state["step"]),
            "epoch": state["step"] / steps_per_epoch,
            "train_loss": running / max(1, running_n),
            "val_recall@5": m["recall@5"],
            "val_ndcg@5": m["ndcg@5"],
            "val_recall@10": m["recall@10"],
            "val_ndcg@10": m["ndcg@10"],
            "val_invalid_id_rate": m["invalid_id_rate"],
            "lr": opt.param_groups[0]["lr"],
            "elapsed_s": time.perf_counter() - t_start,
        }
        running, running_n = 0.0, 0
        improved = rec[f"val_{cfg.select_metric}"] > state["best_metric"] + cfg.min_delta
        if improved:
            state["best_metric"] = rec[f"val_{cfg.select_metric}"]
            state["best_step"] = state["step"]
            state["bad_evals"] = 0
        else:
            state["bad_evals"] += 1
        rec[f"best_val_{cfg.select_metric}"] = state["best_metric"]
        state["history"].append(rec)
        state["train_seconds"] = time.perf_counter() - t_start
        log(
            f"tiger eval @ step {state['step']} (epoch {rec['epoch']:.2f}): loss {rec['train_loss']:.4f}, "
            f"val R@10 {rec['val_recall@10']:.4f} N@10 {rec['val_ndcg@10']:.4f} "
            f"(best {cfg.select_metric} {state['best_metric']:.4f} @ {state['best_step']}), eval {fmt_seconds(m['eval_seconds'])}"
        )
        payload = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "state": state,
            "config": cfg.to_dict(),
            "fingerprint": fingerprint,
            "vocab_size": codec.vocab_size,
            "finished": False,
        }
        if checkpoint_dir is not None:
            if improved:
                save_checkpoint(payload, best_path)
            save_checkpoint(payload, last_path)
        elif improved:
            state["_best_weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_eval:
            on_eval(rec)
        return improved

    model.train()
    done = False
    while not done and state["epoch"] < cfg.epochs:
        batches = epoch_batches(lengths, cfg.batch_size, state["epoch"], cfg.seed, cfg.length_buckets)
        for b in range(state["batch_in_epoch"], len(batches)):
            batch = {k: v.to(device) for k, v in encode_batch(codec, train, batches[b]).items()}
            loss = train_step(model, batch, opt, device, cfg.bf16, cfg.grad_clip)
            sched.step()
            running += float(loss)
            running_n += 1
            state["step"] += 1
            state["batch_in_epoch"] = b + 1
            progress.update(1, extra=f"loss {running / max(1, running_n):.4f}")
            end_of_epoch = b + 1 == len(batches)
            if end_of_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            if state["step"] % eval_every == 0 or end_of_epoch and not cfg.eval_every_steps:
                do_eval()
                if cfg.patience and state["bad_evals"] >= cfg.patience:
                    stop_reason = f"early stopping: no val {cfg.select_metric} gain in {cfg.patience} evaluations"
                    done = True
                elif cfg.max_train_seconds and time.perf_counter() - t_start >= cfg.max_train_seconds:
                    stop_reason = f"time budget {cfg.max_train_seconds:.0f}s reached"
                    done = True
            if not done and cfg.max_steps and state["step"] >= cfg.max_steps:
                stop_reason = f"max_steps {cfg.max_steps} reached"
                done = True
            if not done and cfg.max_train_seconds and time.perf_counter() - t_start >= cfg.max_train_seconds:
                stop_reason = f"time budget {cfg.max_train_seconds:.0f}s reached"
                done = True
            if done:
                break
    if not stop_reason:
        stop_reason = f"{cfg.epochs} epochs done"
    if not state["history"] or state["history"][-1]["step"] != state["step"]:
        do_eval()
    state["train_seconds"] = time.perf_counter() - t_start
    # restore the best weights
    if checkpoint_dir is not None:
        best = load_checkpoint(best_path)
        model.load_state_dict(best["model"])
        final = {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "state": state, "config": cfg.to_dict(), "fingerprint": fingerprint,
            "vocab_size": codec.vocab_size, "finished": True, "stop_reason": stop_reason,
        }
        save_checkpoint(final, last_path)
    elif "_best_weights" in state:
        model.load_state_dict(state.pop("_best_weights"))
    state.pop("_best_weights", None)
    log(f"tiger: stopped ({stop_reason}) after {state['step']} steps in {fmt_seconds(state['train_seconds'])}; best val {cfg.select_metric} {state['best_metric']:.4f} @ step {state['best_step']}")
    return TigerTrainResult(
        model, state["history"], _best_record(state), stop_reason, state["step"], state["step"] / steps_per_epoch,
        state["train_seconds"], resumed_from, {"train_examples": len(train), "steps_per_epoch": steps_per_epoch, "val_users": len(valid)},
    )


def _best_record(state: dict) -> dict[str, float]:
    for rec in state["history"]:
        if rec["step"] == state["best_step"]:
            return dict(rec)
    return dict(state["history"][-1]) if state["history"] else {}


# ------------------------------------------------------------------------------- save / load model
def save_model(model, codec: SidCodec, cfg: TigerConfig, dest: str, extra: Mapping[str, Any] | None = None) -> str:
    """HF model folder + ``codec.json`` + ``tiger_config.json`` (+ ``extra.json``), written atomically."""
    import json

    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        (tmp / "codec.json").write_text(json.dumps(codec.to_dict()), encoding="utf-8")
        (tmp / "tiger_config.json").write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")
        if extra:
            (tmp / "extra.json").write_text(json.dumps(dict(extra), indent=2, default=str), encoding="utf-8")
    return dest


def load_model(src: str):
    """-> (model, codec, config, extra)."""
    import json

    from transformers import T5ForConditionalGeneration

    with local_copy(src) as local:
        local = Path(local)
        model = T5ForConditionalGeneration.from_pretrained(str(local))
        codec = SidCodec.from_dict(json.loads((local / "codec.json").read_text(encoding="utf-8")))
        cfg = TigerConfig.from_dict(json.loads((local / "tiger_config.json").read_text(encoding="utf-8")))
        extra_path = local / "extra.json"
        extra = json.loads(extra_path.read_text(encoding="utf-8")) if extra_path.exists() else {}
    model.eval()
    return model, codec, cfg, extra


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------- shared Beauty evaluation
def evaluate_on_split(model, codec: SidCodec, split, rows: np.ndarray | None = None, stage: str = "test",
                      max_history: int = 20, beams: int = 20, batch_size: int = 128, n_boot: int = 1000, seed: int = 0,
                      label: str = "TIGER", log: LogFn | None = None):
    """TIGER on the one leave-one-out evaluation (``lib.retrieval.evaluation``), same users and rules
    as every other model.

    One constrained beam search per user (``beams`` >= 10 returned sequences, history items not
    excluded from the search): ``unmasked`` = the top 10 of the returned list, ``masked`` = the same list
    with history items removed, then the top 10 (a history item can push a new item out of a short
    list, so this is slightly pessimistic for TIGER compared with excluding them inside the search).
    Returns an ``EvalResult`` whose ``extra`` holds ``invalid_id_rate`` (unconstrained-ID sequences /
    all returned; 0 with the trie) and ``duplicate_rate``."""
    from animind_assets.lib.retrieval.evaluation import evaluate_rankings

    if beams < 10:
        raise ValueError(f"beams ({beams}) must be >= 10 for Recall@10")
    rows = np.arange(len(split)) if rows is None else np.asarray(rows, dtype=np.int64)
    hists = split.histories(stage)
    ex = Examples(split.users[rows].copy(), [hists[i][-max_history:] for i in rows.tolist()], split.targets(stage)[rows].copy())
    t0 = time.perf_counter()
    ranked, counts = generate_rankings(model, codec, ex, k=beams, beams=beams, batch_size=batch_size, log=log, label=label)
    seconds = time.perf_counter() - t0
    res = evaluate_rankings({"masked": ranked, "unmasked": [r[:10] for r in ranked]}, split, stage, label, rows=rows,
                            n_boot=n_boot, seed=seed,
                            extra={"invalid_id_rate": counts["invalid"] / max(1.0, counts["sequences"]),
                                   "duplicate_rate": counts["duplicates"] / max(1.0, counts["sequences"]),
                                   "beams": beams, "users_per_s": len(rows) / max(1e-9, seconds)})
    res.seconds = seconds + res.seconds
    return res

