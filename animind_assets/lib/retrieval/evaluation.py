"""The one leave-one-out evaluation for next-item recommendation (Amazon Beauty protocol).

Protocol (the same users, in the same order, with the same exclusions for every model):

* Split (``SequenceSplit.from_sequences``): per user, in the given chronological order, the last item
  is the **test** target, the second-to-last the **validation** target, and ``seq[:-2]`` is the
  training sequence. Users with fewer than 3 items are skipped and counted. Users are evaluated in
  ascending user-id order.
* History: validation history = ``seq[:-2]``; test history = ``seq[:-1]`` (the validation item is
  part of the test history, as in SASRec/TIGER/RPG). Models may truncate it to their own window.
* Ranking: **full ranking over all items** (no negative sampling). The 0-based rank of the target is
  ``#{items scoring strictly higher} + #{items with an equal score and a smaller item id}``: ties are
  broken by ascending item id (deterministic, neither optimistic nor pessimistic on average).
* Masking: ``mask_seen=True`` sets the score of every item in the user's history to ``-inf`` before
  ranking (``already-seen items are never recommended``); ``False`` ranks them like any other item.
  A target that itself occurs in the history is then unreachable (counted as
  ``targets_in_history``; 0 on the Beauty 5-core split, where repeated pairs are removed).
  Both variants are reported, because they differ by several points in the literature.
* Metrics (one relevant item): Recall@K = hit rate = ``rank < K``; NDCG@K = ``1/log2(rank + 2)`` when
  ``rank < K`` else 0; means over users. 95% intervals: percentile bootstrap over users (``n_boot``
  resamples, seeded).

Models plug in either as a **scorer** (``score_fn(histories) -> (B, n_items)`` float scores, higher is
better; used by ``evaluate_scorer``) or as **rankings** (top-K item lists, e.g. from beam search;
``evaluate_rankings``: an item missing from a list has rank ``>= K``).

Reference: Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (protocol);
Rajput et al., "Recommender Systems with Generative Retrieval", NeurIPS 2023 (Beauty, full ranking).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from animind_assets.lib.common.progress import Progress

KS = (5, 10)
METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
TIE_ORDER = "ties broken by ascending item id"
LogFn = Callable[[str], None]
ScoreFn = Callable[[list[np.ndarray]], "torch.Tensor | np.ndarray"]

# Published reference numbers on the Beauty 5-core leave-one-out split (full ranking). Labelled
# "published" wherever shown; never mixed with measured rows.
PUBLISHED_BEAUTY: dict[str, dict[str, float]] = {
    "TIGER paper (Rajput et al. 2023)": {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384},
    "SASRec 1-neg BCE (table of the TIGER paper)": {"recall@5": 0.0387, "ndcg@5": 0.0249, "recall@10": 0.0605, "ndcg@10": 0.0318},
    "SASRec CE, RecBole (HonghuiBao2000/LETTER issue 20)": {"recall@5": 0.0543, "ndcg@5": 0.0315, "recall@10": 0.0821, "ndcg@10": 0.0405},
    "RPG reproduction (facebookresearch/RPG_KDD2025 issue 3)": {"recall@5": 0.0505, "ndcg@5": 0.0353, "recall@10": 0.0761, "ndcg@10": 0.0436},
    "tiger-cf re-implementation (README)": {"recall@5": 0.0376, "ndcg@5": 0.0252, "recall@10": 0.0582, "ndcg@10": 0.0319},
}


# ------------------------------------------------------------------------------------------- split
@dataclass
class SequenceSplit:
    """Leave-one-out split of per-user item sequences.

    Attributes: ``users`` (U,) int64 ascending; ``train`` list of U int64 arrays (``seq[:-2]``,
    oldest first); ``valid_targets``/``test_targets`` (U,) int64; ``n_items`` (item ids are
    ``0..n_items-1``); ``skipped_users`` (users with < 3 items).
    """

    users: np.ndarray
    train: list[np.ndarray]
    valid_targets: np.ndarray
    test_targets: np.ndarray
    n_items: int
    skipped_users: int = 0

    @classmethod
    def from_sequences(cls, sequences: Mapping[int, Sequence[int]], n_items: int | None = None) -> SequenceSplit:
        """``{user_id: [item_id, ...]}`` (chronological) -> split. Raises ``ValueError`` when an item id
        is negative or ``>= n_items`` (naming the user), or when no user has >= 3 items."""
        users, train, valid, test = [], [], [], []
        skipped = 0
        max_item = -1
        for u in sorted(int(k) for k in sequences):
            seq = np.asarray([int(x) for x in sequences[u]], dtype=np.int64)
            if len(seq) < 3:
                skipped += 1
                continue
            if seq.min() < 0:
                raise ValueError(f"user {u}: negative item id {int(seq.min())}")
            max_item = max(max_item, int(seq.max()))
            users.append(u)
            train.append(seq[:-2])
            valid.append(seq[-2])
            test.append(seq[-1])
        if not users:
            raise ValueError("no user has >= 3 items: nothing to split")
        n = int(n_items) if n_items is not None else max_item + 1
        if max_item >= n:
            raise ValueError(f"item id {max_item} >= n_items {n}")
        return cls(np.asarray(users, dtype=np.int64), train, np.asarray(valid, dtype=np.int64), np.asarray(test, dtype=np.int64), n, skipped)

    def __len__(self) -> int:
        return len(self.users)

    def histories(self, stage: str) -> list[np.ndarray]:
        """``stage='valid'`` -> ``seq[:-2]``; ``'test'`` -> ``seq[:-1]`` (per user, oldest first)."""
        if stage == "valid":
            return self.train
        if stage == "test":
            return [np.append(t, v) for t, v in zip(self.train, self.valid_targets)]
        raise ValueError(f"stage={stage!r}; expected 'valid' or 'test'")

    def targets(self, stage: str) -> np.ndarray:
        if stage == "valid":
            return self.valid_targets
        if stage == "test":
            return self.test_targets
        raise ValueError(f"stage={stage!r}; expected 'valid' or 'test'")

    def train_positions(self) -> int:
        """Number of (prefix -> next item) training targets: sum of ``len(seq[:-2]) - 1``."""
        return int(sum(max(0, len(t) - 1) for t in self.train))

    def stats(self) -> dict[str, Any]:
        lens = np.array([len(t) + 2 for t in self.train])
        return {
            "users": len(self), "items": self.n_items, "skipped_users": self.skipped_users,
            "train_positions": self.train_positions(), "seq_len_mean": float(lens.mean()), "seq_len_max": int(lens.max()),
        }

    def subset(self, n: int, seed: int = 0) -> np.ndarray:
        """A fixed, sorted random subset of ``n`` user rows (all rows when ``n <= 0`` or ``n >= len``):
        ``subset_rows(len(self), n, seed)``."""
        return subset_rows(len(self), n, seed)


def subset_rows(total: int, n: int, seed: int = 0) -> np.ndarray:
    """The seeded user subset of every evaluation here: (n,) int64 sorted row indices in ``0..total-1``, drawn without
    replacement by ``numpy.random.default_rng(seed)``; all ``total`` rows when ``n <= 0`` or ``n >= total``. It
    needs only the number of users, so shards and merged shards (``shard_rows``) name the same users without the data."""
    if n <= 0 or n >= total:
        return np.arange(total, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(total, n, replace=False)).astype(np.int64)


def shard_rows(rows: np.ndarray, shard: int, num_shards: int) -> np.ndarray:
    """Shard ``shard`` of ``num_shards`` (0-based) of the user rows ``rows``: every ``num_shards``-th row from position
    ``shard`` (``rows[shard::num_shards]``), so the shards are disjoint, cover ``rows`` exactly, and each gets users from
    the whole range (similar history lengths, so similar run times). ValueError unless ``0 <= shard < num_shards``."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} of {num_shards}: need num_shards >= 1 and 0 <= shard < num_shards")
    return np.asarray(rows, dtype=np.int64)[shard::num_shards]


def subset_note(requested: int, available: int) -> str:
    """One line saying which users a ``--test-users requested`` subset of ``available`` users evaluates (the rule of
    :meth:`SequenceSplit.subset`): all of them for 0, and also, said plainly, when more are asked for than exist."""
    if requested <= 0:
        return f"test users: all {available:,}"
    if requested >= available:
        return f"test users: all {available:,} (--test-users {requested:,} asks for at least as many as there are)"
    return f"test users: a seeded subset of {requested:,} of {available:,}"


# ------------------------------------------------------------------------------------------ ranks
def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target in a full ranking.

    ``scores`` (B, N) float (higher = better; ``-inf`` allowed), ``targets`` (B,) int64 in ``0..N-1``.
    Returns (B,) int64: ``#{s > s_t} + #{s == s_t and id < t}`` (ties by ascending item id). NaN
    scores raise ``ValueError``.
    """
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (B, N) and targets (B,), got {tuple(scores.shape)} and {tuple(targets.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("NaN in model scores")
    t = scores.gather(1, targets.view(-1, 1))
    higher = (scores > t).sum(1)
    ids = torch.arange(scores.shape[1], device=scores.device).view(1, -1)
    tied_before = ((scores == t) & (ids < targets.view(-1, 1))).sum(1)
    return (higher + tied_before).long()


def heldout_nll(scorer: ScoreFn, split: SequenceSplit, stage: str, rows: np.ndarray, batch_size: int = 512) -> float:
    """Mean negative log-likelihood (nats) of the held-out item of ``stage`` ('valid' or 'test') for the user
    rows ``rows`` ((n,) int64), under a softmax of the scorer's scores over **all** items (seen items are not
    masked: this is the model's own next-item distribution, what a cross-entropy-trained model such as
    SASRec minimises and what distillation passes on). ``scorer``: ``histories -> (B, n_items)`` float
    logits. A lower value means a better calibrated, less overconfident next-item model on held-out data
    (the criterion of temperature scaling, Guo et al., ICML 2017). Raises ``ValueError`` for empty ``rows``
    or NaN scores; an item scored ``-inf`` that is the held-out one gives ``inf``."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        raise ValueError("heldout_nll: no user rows")
    hist = split.histories(stage)
    tgt = split.targets(stage)
    total = 0.0
    for i in range(0, len(rows), batch_size):
        r = rows[i:i + batch_size]
        scores = torch.as_tensor(scorer([hist[j] for j in r])).float()
        if torch.isnan(scores).any():
            raise ValueError("NaN in model scores")
        t = torch.as_tensor(tgt[r], dtype=torch.long, device=scores.device)
        total += float((torch.logsumexp(scores, 1) - scores.gather(1, t.view(-1, 1)).squeeze(1)).sum())
    return total / len(rows)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean Recall@K / NDCG@K from 0-based target ranks (one relevant item per user)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if len(ranks) else 0.0
    return out


def bootstrap_ci(ranks: np.ndarray, ks: Sequence[int] = KS, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval over users for every Recall@K/NDCG@K (seeded, ``n_boot`` resamples)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    n = len(ranks)
    if n == 0 or n_boot <= 0:
        return {}
    rng = np.random.default_rng(seed)
    per_user = {}
    for k in ks:
        hit = ranks < k
        per_user[f"recall@{k}"] = hit.astype(np.float64)
        per_user[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    sums = {m: np.empty(n_boot) for m in per_user}
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        for m, v in per_user.items():
            sums[m][start: start + b] = v[idx].mean(1)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {m: (float(np.percentile(s, lo)), float(np.percentile(s, hi))) for m, s in sums.items()}


# ------------------------------------------------------------------------------------------ result
@dataclass
class EvalResult:
    """Evaluation of one model on one stage.

    ``ranks[mode]`` (U,) int64 0-based target ranks per user row (``mode`` in ``"masked"``,
    ``"unmasked"``); ``metrics[mode]`` means; ``ci[mode][metric] = (lo, hi)`` 95% bootstrap interval.
    """

    model: str
    stage: str
    users: np.ndarray
    ranks: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]
    ci: dict[str, dict[str, tuple[float, float]]]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, mode: str = "masked") -> dict[str, Any]:
        """Flat row: model, mode, metrics, ``<metric>_lo/_hi``, users, seconds, extra scalars."""
        out: dict[str, Any] = {"model": self.model, "masking": mode, **self.metrics[mode]}
        for m, (lo, hi) in self.ci.get(mode, {}).items():
            out[f"{m}_lo"], out[f"{m}_hi"] = lo, hi
        out["users"] = int(len(self.users))
        out["eval_seconds"] = round(self.seconds, 2)
        out.update({k: v for k, v in self.extra.items() if isinstance(v, (int, float, str, bool)) or v is None})
        return out


def protocol(split: SequenceSplit, stage: str, rows: np.ndarray) -> dict[str, Any]:
    """The protocol choices of an evaluation, for tables and metadata."""
    return {
        "stage": stage,
        "users_evaluated": int(len(rows)),
        "users_total": int(len(split)),
        "users_skipped_lt3": int(split.skipped_users),
        "items_ranked": int(split.n_items),
        "ranking": "full ranking over all items (no negative sampling)",
        "tie_order": TIE_ORDER,
        "masking": "reported both: masked = history items scored -inf; unmasked = all items ranked",
        "history": "seq[:-2] (valid) / seq[:-1] (test)",
        "bootstrap": "95% percentile interval over users",
    }


def result_from_ranks(model: str, stage: str, users: np.ndarray, ranks: Mapping[str, np.ndarray], ks: Sequence[int] = KS,
                      n_boot: int = 1000, seed: int = 0, seconds: float = 0.0, extra: Mapping[str, Any] | None = None) -> EvalResult:
    """An ``EvalResult`` from per-user 0-based target ranks already computed (``ranks[mode]`` (U,) int64 for ``users``
    (U,) int64): the means of ``metrics_from_ranks`` and the intervals of ``bootstrap_ci`` (seeded by ``seed``), as every
    evaluation here reports them. Used to merge the ranks of shards evaluated apart. ValueError if a mode's ranks do not
    have one entry per user."""
    users = np.asarray(users, dtype=np.int64)
    ranks = {m: np.asarray(r, dtype=np.int64) for m, r in ranks.items()}
    for m, r in ranks.items():
        if r.shape != users.shape:
            raise ValueError(f"mode {m!r}: {r.shape[0]} ranks for {users.shape[0]} users")
    metrics = {m: metrics_from_ranks(r, ks) for m, r in ranks.items()}
    ci = {m: bootstrap_ci(r, ks, n_boot=n_boot, seed=seed) for m, r in ranks.items()}
    return EvalResult(model, stage, users, ranks, metrics, ci, seconds, dict(extra or {}))


def _finish(model: str, stage: str, split: SequenceSplit, rows: np.ndarray, ranks: dict[str, np.ndarray], t0: float,
            ks: Sequence[int], n_boot: int, seed: int, extra: dict) -> EvalResult:
    return result_from_ranks(model, stage, split.users[rows], ranks, ks, n_boot, seed, time.perf_counter() - t0, extra)


@torch.no_grad()
def evaluate_scorer(
    score_fn: ScoreFn,
    split: SequenceSplit,
    stage: str = "test",
    model: str = "model",
    rows: np.ndarray | None = None,
    modes: Sequence[str] = ("masked", "unmasked"),
    ks: Sequence[int] = KS,
    batch_size: int = 256,
    n_boot: int = 1000,
    seed: int = 0,
    log: LogFn | None = None,
) -> EvalResult:
    """Rank every item for every user row with ``score_fn`` and compute Recall/NDCG@K.

    ``score_fn(histories)`` gets a list of B int64 arrays (item ids, oldest first) and returns (B,
    n_items) scores (torch or numpy, any float dtype). ``rows`` selects user rows (default all).
    Returns an ``EvalResult`` with ``ranks``/``metrics``/``ci`` for each mode in ``modes``. Raises
    ``ValueError`` on a wrong score shape or NaN scores.
    """
    for m in modes:
        if m not in ("masked", "unmasked"):
            raise ValueError(f"mode {m!r}; expected 'masked' or 'unmasked'")
    t0 = time.perf_counter()
    rows = np.arange(len(split)) if rows is None else np.asarray(rows, dtype=np.int64)
    hist_all = split.histories(stage)
    targets_all = split.targets(stage)
    ranks = {m: np.empty(len(rows), dtype=np.int64) for m in modes}
    in_hist = 0
    progress = Progress(f"eval {model} [{stage}]", total=len(rows), unit="users", log=log, every_s=30.0)
    for start in range(0, len(rows), batch_size):
        idx = rows[start: start + batch_size]
        hists = [hist_all[i] for i in idx.tolist()]
        scores = score_fn(hists)
        scores = torch.as_tensor(scores).float()
        if scores.shape != (len(idx), split.n_items):
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}; expected ({len(idx)}, {split.n_items})")
        targets = torch.as_tensor(targets_all[idx], device=scores.device)
        if "unmasked" in modes:
            ranks["unmasked"][start: start + len(idx)] = target_ranks(scores, targets).cpu().numpy()
        if "masked" in modes:
            r_idx = np.concatenate([np.full(len(h), r) for r, h in enumerate(hists)]) if hists else np.zeros(0, np.int64)
            c_idx = np.concatenate(hists) if hists else np.zeros(0, np.int64)
            in_hist += sum(int(t in set(h.tolist())) for t, h in zip(targets_all[idx].tolist(), hists))
            masked = scores.clone()
            masked[torch.as_tensor(r_idx, device=scores.device), torch.as_tensor(c_idx, device=scores.device)] = -math.inf
            ranks["masked"][start: start + len(idx)] = target_ranks(masked, targets).cpu().numpy()
        progress.update(len(idx))
    return _finish(model, stage, split, rows, ranks, t0, ks, n_boot, seed, {"targets_in_history": in_hist})


def evaluate_rankings(
    rankings: Mapping[str, Sequence[Sequence[int]]],
    split: SequenceSplit,
    stage: str = "test",
    model: str = "model",
    rows: np.ndarray | None = None,
    ks: Sequence[int] = KS,
    n_boot: int = 1000,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Recall/NDCG@K from top-K item lists (generative models), one list per user row and mode.

    ``rankings[mode][j]`` is the ranked item list of user row ``rows[j]``; duplicates count once (first
    place). For ``mode='masked'`` history items still present are removed here (so a model that did not
    exclude them is evaluated under the same rule). A target absent from the list gets rank
    ``max(ks)`` (no hit at any reported K)."""
    t0 = time.perf_counter()
    rows = np.arange(len(split)) if rows is None else np.asarray(rows, dtype=np.int64)
    hist_all = split.histories(stage)
    targets = split.targets(stage)
    kmax = max(ks)
    ranks: dict[str, np.ndarray] = {}
    for mode, lists in rankings.items():
        if mode not in ("masked", "unmasked"):
            raise ValueError(f"mode {mode!r}; expected 'masked' or 'unmasked'")
        if len(lists) != len(rows):
            raise ValueError(f"{len(lists)} rankings for mode {mode!r} but {len(rows)} user rows")
        r = np.full(len(rows), kmax, dtype=np.int64)
        for j, (i, ranked) in enumerate(zip(rows.tolist(), lists)):
            ranked = list(dict.fromkeys(int(x) for x in ranked))
            if mode == "masked":
                seen = set(hist_all[i].tolist())
                ranked = [x for x in ranked if x not in seen]
            t = int(targets[i])
            if t in ranked[:kmax]:
                r[j] = ranked.index(t)
        ranks[mode] = r
    return _finish(model, stage, split, rows, ranks, t0, ks, n_boot, seed, dict(extra or {}))


# ------------------------------------------------------------------------------------- popularity
def popularity_counts(split: SequenceSplit, stage: str = "test") -> np.ndarray:
    """(n_items,) float64 interaction counts of everything a model may see before ``stage``:
    training sequences, plus the validation targets for ``stage='test'``."""
    counts = np.bincount(np.concatenate(split.train), minlength=split.n_items).astype(np.float64)
    if stage == "test":
        counts += np.bincount(split.valid_targets, minlength=split.n_items)
    return counts


def popularity_scorer(split: SequenceSplit, stage: str = "test") -> ScoreFn:
    """Most-popular baseline as a scorer: every user gets the item counts of ``popularity_counts``
    (ties -> ascending item id, as for every model)."""
    counts = torch.as_tensor(popularity_counts(split, stage), dtype=torch.float32)

    def score(histories: list[np.ndarray]) -> torch.Tensor:
        return counts.view(1, -1).expand(len(histories), -1)

    return score


# ------------------------------------------------------------------------------------------ tables
def format_table(rows: Sequence[Mapping[str, Any]], with_ci: bool = True, extra_cols: Sequence[str] = ()) -> str:
    """Plain-text table: model, masking, R@5, N@5, R@10, N@10 (``value [lo, hi]`` when ``with_ci``),
    plus ``extra_cols``."""
    def cell(r: Mapping[str, Any], m: str) -> str:
        v = r.get(m)
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        s = f"{v:.4f}"
        if with_ci and r.get(f"{m}_lo") is not None:
            s += f" [{r[f'{m}_lo']:.4f},{r[f'{m}_hi']:.4f}]"
        return s

    cols = ["model", "masking", *METRICS, *extra_cols]
    body = [[str(r.get("model", "")), str(r.get("masking", "")), *(cell(r, m) for m in METRICS),
             *(_fmt(r.get(c)) for c in extra_cols)] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    out = [line, "-" * len(line)]
    for b in body:
        out.append("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(b, widths))))
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)
