"""Producer side of the embedding pipeline: tokenize, length-sort, cut and pad batches (no Dagster).

``direct_batches`` tokenizes a window of texts with the model's fast (Rust) tokenizer straight into
flat int32 buffers, sorts the window by token length (longest first: padding is minimal and memory
peaks early), cuts batches of ``batch_size`` texts capped at ``token_budget`` padded tokens and pads
them with numpy, honouring the tokenizer's pad id and padding side. ``module_batches`` does the same
with a Sentence-Transformers model's own ``preprocess`` for layouts the direct path does not cover.
Both yield ``(indices, features)``: ``indices`` int64 (B,) positions in the caller's text list,
``features`` a dict of torch tensors (``input_ids``/``attention_mask`` int64 (B, T) for the direct path).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

TOKENIZE_CHUNK = 1024  # texts per tokenizer call (bounds the tokenizer's Python lists at peak)


def tokenize_flat(tokenizer, texts: Sequence[str], max_length: int, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``texts`` -> ``(lens int64 (N,), flat int32 (sum lens,))`` with special tokens, truncated at
    ``max_length`` tokens; ``prefix`` is prepended to every text."""
    lens_parts: list[np.ndarray] = []
    flat_parts: list[np.ndarray] = []
    for c in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[c : c + TOKENIZE_CHUNK]
        inputs = [prefix + t for t in chunk] if prefix else list(chunk)
        ids_list = tokenizer(inputs, add_special_tokens=True, truncation=True, max_length=max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        part_lens = np.fromiter((len(x) for x in ids_list), dtype=np.int64, count=len(ids_list))
        lens_parts.append(part_lens)
        flat_parts.append(np.fromiter(itertools.chain.from_iterable(ids_list), dtype=np.int32, count=int(part_lens.sum())))
        del ids_list
    if not lens_parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    return np.concatenate(lens_parts), np.concatenate(flat_parts)


def direct_batches(
    tokenizer,
    texts: Sequence[str],
    offset: int,
    *,
    max_length: int,
    batch_size: int,
    token_budget: int | None,
    prefix: str = "",
    pin_memory: bool = False,
    tail_split: int = 1,
) -> Iterator[tuple[np.ndarray, dict]]:
    """Tokenize a window, sort by token length, yield ``(indices + offset, {"input_ids", "attention_mask"})``
    (int64 torch tensors (B, T), T = longest text of the batch; B <= batch_size and B * T <= token_budget
    unless one text alone is longer).

    ``tail_split`` (the number of inference workers, for the last window of a run): once no more than
    ``tail_split`` full batches remain, the rest is cut into ``2 * tail_split`` equal smaller batches, so
    the workers, which pull batches from one queue, finish within a small batch of each other instead of
    one worker running a whole extra batch alone (a guided schedule; with 2 workers and 7 batches that
    idle tail was ~1/8 of the run)."""
    import torch

    lens, flat = tokenize_flat(tokenizer, texts, max_length, prefix)
    starts = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    order = np.argsort(-lens, kind="stable")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    s = 0
    tail_size: int | None = None
    while s < len(order):
        width = int(lens[order[s]])  # longest in the batch (sorted descending)
        size = batch_size if not token_budget else max(1, min(batch_size, token_budget // max(width, 1)))
        rest = len(order) - s
        if tail_size is None and tail_split > 1 and rest <= tail_split * size:
            tail_size = max(1, -(-rest // (2 * tail_split)))
        if tail_size is not None:
            size = min(size, tail_size)
        idx = order[s : s + size]
        s += size
        input_ids = np.full((len(idx), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for r, j in enumerate(idx):
            n = int(lens[j])
            sl = slice(width - n, width) if left else slice(0, n)
            input_ids[r, sl] = flat[starts[j] : starts[j] + n]
            mask[r, sl] = 1
        feats = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if pin_memory:
            feats = {k: v.pin_memory() for k, v in feats.items()}
        yield idx + offset, feats


def module_batches(
    st_model, texts: Sequence[str], offset: int, *, batch_size: int, prefix: str = "", pin_memory: bool = False
) -> Iterator[tuple[np.ndarray, dict]]:
    """Batches for the Sentence-Transformers module path: sorted by character length (longest first),
    features from ``st_model.preprocess`` (the model's own tokenization and prompt handling)."""
    lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    order = np.argsort(-lens, kind="stable")
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        feats = st_model.preprocess([texts[j] for j in idx], prompt=prefix or None)
        if pin_memory:
            feats = {k: (v.pin_memory() if hasattr(v, "pin_memory") else v) for k, v in feats.items()}
        yield idx + offset, feats
