"""TIGER data side: the semantic-ID codec (item <-> token ids), the reference index reader, the leave-one-out
examples and length-bucketed batches. Used by ``tiger`` (training) and ``tiger_generate`` (beam search). No Dagster."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from animind_assets.lib.semantic_ids.trie import SidTrie
from animind_assets.lib.common.device import resolve_device  # noqa: F401  (the one device rule; re-exported)
from animind_assets.lib.retrieval.seqtrain import epoch_batches  # noqa: F401  (one owner: seqtrain)

PAD_ID = 0
EOS_ID = 1
N_SPECIAL = 2
LogFn = Callable[[str], None]


def noop_log(_: str) -> None:
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






def rqkmeans_ids(vectors: np.ndarray, levels: int = 3, codebook_size: int = 256, seed: int = 0,
                 log: LogFn | None = None, with_codebooks: bool = False):
    """Semantic IDs of arbitrary item vectors by RQ-KMeans, the recipe reproductions found to match or beat
    RQ-VAE (residual k-means: each level clusters the previous level's residual; the project's
    ``ResidualKMeans``, centred, L2-normalised residuals, Ward-seeded level 1) plus one disambiguation code
    so every ID is unique (``assign_semantic_ids``: 0, 1, 2, ... inside a group of items with equal codes,
    in item order).

    ``vectors`` (N, D) float, row i = item i (e.g. SASRec item embeddings: collaborative IDs). Returns
    ``(codes (N, levels + 1) int64, stats)`` with ``stats`` = the largest collision group, the number of
    items sharing their first ``levels`` codes with another item, and the k-means inertias. Fewer items
    than ``codebook_size``: the project's small-catalog rule (``small_catalog_codebook``, "adapt") fits
    ``max(2, N // 4)`` codes per level instead, so deeper levels do not collapse to one code; ``stats``
    then carries ``requested_codebook_size`` and ``note``. Raises ``ValueError`` for an empty or non-2-D
    matrix or non-finite values. ``with_codebooks``: returns ``(codes, stats, codebooks)`` with the k-means
    centroids of each level, a list of ``levels`` float32 arrays (codebook_size, D) (centred, L2-normalised
    residual space), e.g. for the LM's ``warm_start="projection"``."""
    from animind_assets.lib.semantic_ids.assign import assign_semantic_ids
    from animind_assets.lib.semantic_ids.quantizers.config import QuantizerConfig, small_catalog_codebook
    from animind_assets.lib.semantic_ids.quantizers.model import ResidualKMeans

    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty (N, D) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"vectors: row {int(np.argwhere(~np.isfinite(x))[0][0])} is not finite")
    requested = codebook_size
    codebook_size, note = small_catalog_codebook(x.shape[0], codebook_size, "adapt")
    if note and log:
        log(f"rqkmeans_ids: {note}")
    cfg = QuantizerConfig(quantizer="rqkmeans", levels=levels, codebook_size=codebook_size, seed=seed)
    model = ResidualKMeans(x.shape[1], cfg)
    xt = torch.from_numpy(x)
    inertias = model.fit(xt, seed=seed, log=log)
    base = model.codes(xt).numpy()
    codes = assign_semantic_ids(base)
    _, inverse, counts = np.unique(base, axis=0, return_inverse=True, return_counts=True)
    stats = {"levels": levels + 1, "codebook_size": codebook_size, "max_collision_group": int(counts.max()),
             "items_in_collisions": int((counts[inverse.reshape(-1)] > 1).sum()),
             "inertias": [float(v) for v in inertias]}
    if note:
        stats.update(requested_codebook_size=requested, note=note)
    if with_codebooks:
        return codes, stats, [model.centroids[i].detach().numpy().copy() for i in range(levels)]
    return codes, stats
