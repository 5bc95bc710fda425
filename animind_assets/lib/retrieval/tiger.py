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
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from animind_assets.lib.common.metrics import ranking_metrics
from animind_assets.lib.common.progress import Progress, fmt_seconds
from animind_assets.lib.semantic_ids.trie import SidTrie
from animind_assets.lib.common.checkpoint import load_payload, save_payload
from animind_assets.lib.common.device import resolve_device  # noqa: F401  (the one device rule; re-exported)
from animind_assets.lib.common.storage import atomic_dir, local_copy

PAD_ID = 0
EOS_ID = 1
N_SPECIAL = 2
LogFn = Callable[[str], None]


def _noop(_: str) -> None:
    return None


# ------------------------------------------------------------------------------------------ codec
class SidCodec:
    """Item ids <-> semantic-ID token sequences (one token block per level)."""

    def __init__(self, item_ids: Sequence[int], codes: np.ndarray, user_buckets: int = 0, level_sizes: Sequence[int] | None = None) -> None:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] != len(item_ids):
            raise ValueError(f"codes must be (n_items, levels) for {len(item_ids)} items, got shape {codes.shape}")
        if codes.shape[0] == 0:
            raise ValueError("no items with semantic IDs")
        if (codes < 0).any():
            row = int(np.argwhere(codes < 0)[0][0])
            raise ValueError(f"negative code for item {item_ids[row]}: {codes[row].tolist()}")
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        if len(set(self.item_ids.tolist())) != len(self.item_ids):
            raise ValueError("duplicate item ids in the semantic-ID mapping")
        uniq, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
        if (counts > 1).any():
            dup = np.flatnonzero(counts[inverse.reshape(-1)] > 1)[:6]
            raise ValueError(
                f"semantic IDs are not unique: {int((counts > 1).sum())} ID tuples are shared, e.g. items "
                f"{self.item_ids[dup].tolist()} (run unique-ID disambiguation first)"
            )
        self.codes = codes
        self.levels = int(codes.shape[1])
        observed = (codes.max(axis=0) + 1).tolist()
        if level_sizes is None:
            level_sizes = observed
        if len(level_sizes) != self.levels or any(int(s) < int(o) for s, o in zip(level_sizes, observed)):
            raise ValueError(f"level_sizes {list(level_sizes)} do not cover the observed codes {observed}")
        self.level_sizes = [int(s) for s in level_sizes]
        self.offsets = [N_SPECIAL + int(sum(self.level_sizes[:lv])) for lv in range(self.levels)]
        self.tokens = codes + np.asarray(self.offsets, dtype=np.int64)[None, :]
        self.row_of = {int(i): r for r, i in enumerate(self.item_ids.tolist())}
        self.user_buckets = int(user_buckets)
        self.user_offset = N_SPECIAL + int(sum(self.level_sizes))
        self.vocab_size = self.user_offset + self.user_buckets
        self._by_tokens = {tuple(t): int(i) for t, i in zip(self.tokens.tolist(), self.item_ids.tolist())}

    @classmethod
    def from_mapping(cls, mapping: Mapping[int, Sequence[int]], user_buckets: int = 0) -> SidCodec:
        if not mapping:
            raise ValueError("empty semantic-ID mapping")
        ids = sorted(int(k) for k in mapping)
        lengths = Counter(len(mapping[i]) for i in ids)
        if len(lengths) != 1:
            raise ValueError(f"semantic IDs must all have the same length, got lengths {dict(lengths)}")
        return cls(ids, np.asarray([list(mapping[i]) for i in ids], dtype=np.int64), user_buckets)

    def __len__(self) -> int:
        return len(self.item_ids)

    def has(self, item_id: int) -> bool:
        return int(item_id) in self.row_of

    def rows(self, items: Iterable[int]) -> np.ndarray:
        return np.fromiter((self.row_of[int(i)] for i in items), dtype=np.int64)

    def user_token(self, user_id: int) -> int | None:
        if self.user_buckets <= 0:
            return None
        return self.user_offset + (int(user_id) * 2654435761 % (2**32)) % self.user_buckets

    def encoder_tokens(self, history: Sequence[int], user_id: int | None = None) -> list[int]:
        toks = self.tokens[self.rows(history)].reshape(-1).tolist()
        ut = self.user_token(user_id) if user_id is not None else None
        return ([ut] if ut is not None else []) + toks

    def target_tokens(self, item_id: int) -> list[int]:
        return self.tokens[self.row_of[int(item_id)]].tolist() + [EOS_ID]

    def decode(self, tokens: Sequence[int]) -> int | None:
        """Token sequence (level tokens, optionally followed by EOS/pad) -> item id, or None if invalid."""
        toks = [int(t) for t in tokens]
        while toks and toks[0] == PAD_ID:
            toks = toks[1:]
        core = tuple(toks[: self.levels])
        rest = toks[self.levels:]
        if len(core) != self.levels or any(t not in (EOS_ID, PAD_ID) for t in rest[:1]):
            return None
        return self._by_tokens.get(core)

    def trie(self) -> SidTrie:
        trie = SidTrie(end_token_id=EOS_ID)
        for toks, item in zip(self.tokens.tolist(), self.item_ids.tolist()):
            trie.add(toks, item=int(item))
        return trie

    def to_dict(self) -> dict[str, Any]:
        return {
            "item_ids": self.item_ids.tolist(),
            "codes": self.codes.tolist(),
            "level_sizes": self.level_sizes,
            "user_buckets": self.user_buckets,
            "pad_id": PAD_ID,
            "eos_id": EOS_ID,
            "offsets": self.offsets,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SidCodec:
        return cls(data["item_ids"], np.asarray(data["codes"], dtype=np.int64), int(data.get("user_buckets", 0)), data.get("level_sizes"))


def load_reference_index(path: str | Path) -> dict[int, list[int]]:
    """tiger-cf ``index_rqvae.json`` / ``index_rqkmeans.json``: ``{"<item_id>": [c1, c2, c3, c4]}``."""
    import json

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"reference semantic-ID index not found: {p}")
    with open(p, encoding="utf-8") as fh:
        raw = json.load(fh)
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: expected an object {{item_id: [codes]}}")
    out: dict[int, list[int]] = {}
    for k, v in raw.items():
        try:
            out[int(k)] = [int(c) for c in v]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{p}: bad entry {k!r}: {v!r}") from exc
    return out


# ------------------------------------------------------------------------------------------ split
@dataclass
class Examples:
    users: np.ndarray  # (n,) int64
    histories: list[np.ndarray]  # item ids, oldest first, at most max_history
    targets: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Examples:
        idx = np.asarray(idx, dtype=np.int64)
        return Examples(self.users[idx], [self.histories[i] for i in idx.tolist()], self.targets[idx])


@dataclass
class LooSplit:
    train: Examples
    valid: Examples
    test: Examples
    train_sequences: dict[int, list[int]]  # seq[:-2] per user (what the model may learn from)
    skipped_users: int = 0

    def stats(self) -> dict[str, float]:
        hl = np.array([len(h) for h in self.train.histories]) if len(self.train) else np.zeros(1)
        return {
            "train_examples": len(self.train),
            "valid_users": len(self.valid),
            "test_users": len(self.test),
            "skipped_users": self.skipped_users,
            "train_history_mean": float(hl.mean()),
        }


def _examples(rows: list[tuple[int, list[int], int]]) -> Examples:
    return Examples(
        np.asarray([r[0] for r in rows], dtype=np.int64),
        [np.asarray(r[1], dtype=np.int64) for r in rows],
        np.asarray([r[2] for r in rows], dtype=np.int64),
    )


def leave_one_out(sequences: Mapping[int, Sequence[int]], max_history: int = 20) -> LooSplit:
    """Per-user leave-one-out split; users with fewer than 3 items are skipped (counted)."""
    if max_history < 1:
        raise ValueError("max_history must be >= 1")
    train, valid, test = [], [], []
    train_seqs: dict[int, list[int]] = {}
    skipped = 0
    for user in sorted(sequences):
        seq = [int(x) for x in sequences[user]]
        if len(seq) < 3:
            skipped += 1
            continue
        head = seq[:-2]
        train_seqs[int(user)] = head
        for t in range(1, len(head)):
            train.append((int(user), head[max(0, t - max_history): t], head[t]))
        valid.append((int(user), head[-max_history:], seq[-2]))
        test.append((int(user), seq[:-1][-max_history:], seq[-1]))
    return LooSplit(_examples(train), _examples(valid), _examples(test), train_seqs, skipped)


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
    lr_schedule: str = "inverse_sqrt"  # "inverse_sqrt" | "cosine" | "constant"
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
    bf16: bool = False  # bf16 autocast for the training forward pass (CPU with AVX512-BF16 or CUDA)
    length_buckets: int = 50  # batches per sorted-by-length bucket (less padding)

    def validate(self) -> TigerConfig:
        if self.lr_schedule not in ("inverse_sqrt", "cosine", "constant"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; expected inverse_sqrt | cosine | constant")
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


# ---------------------------------------------------------------------------------------- batching
def encode_batch(codec: SidCodec, ex: Examples, idx: Sequence[int], with_labels: bool = True) -> dict[str, torch.Tensor]:
    seqs = [codec.encoder_tokens(ex.histories[i], int(ex.users[i]) if codec.user_buckets else None) for i in idx]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if with_labels:
        out["labels"] = torch.tensor([codec.target_tokens(int(ex.targets[i])) for i in idx], dtype=torch.long)
    return out


def epoch_batches(lengths: np.ndarray, batch_size: int, epoch: int, seed: int, bucket_batches: int = 50) -> list[np.ndarray]:
    """Deterministic batches for one epoch: shuffle, sort by length inside buckets of
    ``bucket_batches`` batches (little padding), then shuffle the batch order."""
    rng = np.random.default_rng(seed * 1_000_003 + epoch)
    perm = rng.permutation(len(lengths))
    bucket = max(1, bucket_batches) * batch_size
    batches: list[np.ndarray] = []
    for start in range(0, len(perm), bucket):
        chunk = perm[start: start + bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def lr_factor(step: int, cfg: TigerConfig, total_steps: int) -> float:
    warm = max(1, cfg.warmup_steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "inverse_sqrt":
        return math.sqrt(warm / (step + 1))
    if cfg.lr_schedule == "cosine":
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


# ------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate_rankings(
    model,
    codec: SidCodec,
    ex: Examples,
    k: int = 10,
    beams: int = 20,
    batch_size: int = 128,
    constrained: bool = True,
    trie: SidTrie | None = None,
    log: LogFn | None = None,
    label: str = "decode",
    exclude_history: bool = False,
) -> tuple[list[list[int]], dict[str, float]]:
    """Top-``k`` item ids per example by beam search (``beams >= k``) over semantic IDs.

    ``constrained=True`` restricts every step to the trie of valid IDs (``SidTrie``). With
    ``exclude_history`` the items already in the example's history are also removed from the search
    (at the last ID level, as tiger-cf does; an item whose whole prefix is banned is dropped from the
    ranking afterwards). Returns the rankings (invalid sequences are left out) and counts:
    ``sequences`` generated, ``invalid`` (not a real item), ``duplicates``, ``excluded``.
    """
    if beams < k:
        raise ValueError(f"beams ({beams}) must be >= k ({k})")
    model.eval()
    device = next(model.parameters()).device
    trie = trie if trie is not None else (codec.trie() if constrained else None)
    rankings: list[list[int]] = []
    total = invalid = dups = excluded = 0
    progress = Progress(label, total=len(ex), unit="users", log=log, every_s=15.0)
    lengths = np.array([len(h) for h in ex.histories])
    order = np.argsort(lengths, kind="stable")
    results: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        batch = {k: v.to(device) for k, v in encode_batch(codec, ex, idx, with_labels=False).items()}
        fn = None
        if constrained:
            banned = [_banned_last_tokens(codec, ex.histories[i]) for i in idx.tolist()] if exclude_history else None
            fn = _allowed_fn(trie, codec.levels, banned)
        out = model.generate(
            **batch,
            num_beams=beams,
            num_return_sequences=k,
            max_new_tokens=codec.levels + 1,
            min_new_tokens=codec.levels if not constrained else None,
            do_sample=False,
            prefix_allowed_tokens_fn=fn,
            early_stopping=True,
            length_penalty=0.0,
        )
        seqs = out.tolist()
        for r, i in enumerate(idx.tolist()):
            items: list[int] = []
            seen = set(ex.histories[i].tolist()) if exclude_history else set()
            for s in seqs[r * k: (r + 1) * k]:
                total += 1
                item = codec.decode(s)
                if item is None:
                    invalid += 1
                elif item in items:
                    dups += 1
                elif item in seen:
                    excluded += 1
                else:
                    items.append(item)
            results[i] = items
        progress.update(len(idx))
    rankings = [results[i] for i in range(len(ex))]
    return rankings, {"sequences": float(total), "invalid": float(invalid), "duplicates": float(dups), "excluded": float(excluded)}


def _banned_last_tokens(codec: SidCodec, history: np.ndarray) -> dict[tuple[int, ...], set[int]]:
    """{ID prefix (all levels but the last): {last-level tokens of history items}}."""
    out: dict[tuple[int, ...], set[int]] = {}
    for toks in codec.tokens[codec.rows(history.tolist())].tolist():
        out.setdefault(tuple(toks[:-1]), set()).add(toks[-1])
    return out


def _allowed_fn(trie: SidTrie, levels: int, banned: list[dict] | None):
    """``prefix_allowed_tokens_fn`` over ``trie`` (decoder prompt = the start token), optionally
    without the history items of each batch row."""

    def fn(batch_id: int, input_ids) -> list[int]:
        generated = input_ids.tolist()[1:]
        allowed = trie.allowed(generated)
        if not allowed:
            return [PAD_ID]
        if banned is not None and len(generated) == levels - 1:
            ban = banned[batch_id].get(tuple(generated))
            if ban:
                keep = [t for t in allowed if t not in ban]
                if keep:
                    return keep
        return allowed

    return fn


def evaluate(
    model,
    codec: SidCodec,
    ex: Examples,
    ks: Sequence[int] = (5, 10),
    beams: int = 20,
    batch_size: int = 128,
    constrained: bool = True,
    log: LogFn | None = None,
    label: str = "eval",
    exclude_history: bool = False,
) -> dict[str, float]:
    """Recall@K / NDCG@K (one target per user) + invalid-ID rate of the generated top-max(K) IDs."""
    kmax = max(ks)
    t0 = time.perf_counter()
    rankings, counts = generate_rankings(
        model, codec, ex, k=kmax, beams=beams, batch_size=batch_size, constrained=constrained, log=log, label=label,
        exclude_history=exclude_history,
    )
    metrics = ranking_metrics(rankings, ex.targets.tolist(), ks=ks)
    metrics["invalid_id_rate"] = counts["invalid"] / max(1.0, counts["sequences"])
    metrics["duplicate_rate"] = counts["duplicates"] / max(1.0, counts["sequences"])
    metrics["history_item_rate"] = counts["excluded"] / max(1.0, counts["sequences"])
    metrics["eval_seconds"] = time.perf_counter() - t0
    metrics["users_per_s"] = len(ex) / max(1e-9, metrics["eval_seconds"])
    return metrics


def popularity_rankings(train_sequences: Mapping[int, Sequence[int]], valid: Examples | None = None, k: int = 10) -> list[int]:
    """The ``k`` most frequent items in the training sequences (+ validation targets when given:
    everything a test-time model may have seen)."""
    counts: Counter = Counter()
    for seq in train_sequences.values():
        counts.update(int(x) for x in seq)
    if valid is not None:
        counts.update(int(x) for x in valid.targets.tolist())
    return [item for item, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def popularity_metrics(split: LooSplit, ks: Sequence[int] = (5, 10), exclude_history: bool = False, test: Examples | None = None) -> dict[str, float]:
    """Most-popular baseline on ``test`` (default: the split's test users); with ``exclude_history``
    each user's history items are skipped, as for the model."""
    test = test if test is not None else split.test
    kmax = max(ks)
    top = popularity_rankings(split.train_sequences, split.valid, k=kmax + (max((len(h) for h in test.histories), default=0) if exclude_history else 0))
    if exclude_history:
        rankings = []
        for h in test.histories:
            seen = set(h.tolist())
            rankings.append([i for i in top if i not in seen][:kmax])
    else:
        rankings = [top[:kmax]] * len(test)
    out = ranking_metrics(rankings, test.targets.tolist(), ks=ks)
    out["invalid_id_rate"] = 0.0
    return out


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
    log = log or _noop
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
    model = build_model(codec, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
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
    stop_reason = ""
    running, running_n = 0.0, 0
    progress = Progress("tiger train", total=total_steps, unit="steps", log=log, every_s=30.0)
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
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = model(**batch).loss
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            running += float(loss.detach())
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


# ----------------------------------------------------------------------------------- reporting
TIGER_PAPER_BEAUTY = {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384}
TIGER_CF_BEAUTY = {"recall@5": 0.0376, "ndcg@5": 0.0252, "recall@10": 0.0582, "ndcg@10": 0.0319}
REPORT_METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


def comparison_bar_png(rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str] = REPORT_METRICS, title: str = "") -> bytes:
    """Grouped bars: one group per metric, one bar per row (model)."""
    from animind_assets.lib.common.plots import fig_to_png, plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        vals = [float(rows[name].get(m) or 0.0) for m in metrics]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, vals, width=width, label=name)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(list(metrics))
    ax.set_ylabel("score")
    ax.set_title(title or "Amazon Beauty, leave-one-out test")
    ax.legend(fontsize=7)
    return fig_to_png(fig)


def metrics_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = REPORT_METRICS) -> str:
    """Plain-text table for scripts."""
    name_w = max([len("model"), *(len(n) for n in rows)]) + 2
    widths = [max(10, len(c) + 2) for c in columns]
    head = f"{'model':<{name_w}}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths))
    lines = [head, "-" * len(head)]
    for name, vals in rows.items():
        cells = []
        for c, w in zip(columns, widths):
            v = vals.get(c)
            cells.append(f"{v:>{w}.4f}" if isinstance(v, (int, float)) and v == v else f"{'-':>{w}}")
        lines.append(f"{name:<{name_w}}" + "".join(cells))
    return "\n".join(lines)


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
