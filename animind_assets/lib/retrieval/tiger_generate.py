"""TIGER generation: trie-constrained beam search over semantic IDs (Rajput et al., NeurIPS 2023, "Recommender
Systems with Generative Retrieval"), its evaluation and the popularity reference. No Dagster."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from animind_assets.lib.common.metrics import ranking_metrics
from animind_assets.lib.common.progress import Progress
from animind_assets.lib.semantic_ids.trie import SidTrie
from animind_assets.lib.common.device import resolve_device  # noqa: F401  (the one device rule; re-exported)
from animind_assets.lib.retrieval.tiger_data import PAD_ID, Examples, LogFn, LooSplit, SidCodec, encode_batch

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


