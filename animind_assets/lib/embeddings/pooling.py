"""Pooling of token states into one vector per text (torch tensors; no Dagster).

Modes follow Sentence-Transformers' ``Pooling`` module: ``mean`` (attention-masked mean, Reimers &
Gurevych 2019, Sentence-BERT), ``cls`` (first non-pad token), ``last_token`` (last non-pad token, as
used by decoder embedders such as Qwen3-Embedding; works with left and right padding) and ``max``.
"""

from __future__ import annotations

from animind_assets.lib.embeddings.config import EmbeddingError


def pool(hidden, mask, mode: str, skip_first: int = 0):
    """Pool token states ``hidden`` (B, T, H), any float dtype, with attention mask ``mask`` (B, T), 0/1
    ints, into (B, H) float32 with ``mode`` (see module docstring); ``skip_first`` prompt tokens are
    left out of mean pooling. Raises ``EmbeddingError`` for an unknown mode."""
    import torch

    h = hidden.float()
    m = mask
    if mode == "mean":
        if skip_first:
            m = exclude_prefix(m, skip_first)
        w = m.unsqueeze(-1).to(h.dtype)
        return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
    if mode == "cls":
        first = m.to(torch.int32).argmax(dim=1)
        return h[torch.arange(h.shape[0], device=h.device), first]
    if mode == "last_token":
        seq = m.shape[1]
        values, idx = m.flip(1).max(1)
        idx = torch.where(values == 0, torch.full_like(idx, seq - 1), idx)
        last = seq - 1 - idx
        return h[torch.arange(h.shape[0], device=h.device), last]
    if mode == "max":
        return h.masked_fill(m.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
    raise EmbeddingError(f"unsupported pooling {mode!r}")


def exclude_prefix(mask, n: int):
    """Copy of ``mask`` (B, T) with the first ``n`` real tokens of each row zeroed (prompt tokens left
    out of mean pooling, as Sentence-Transformers does with ``include_prompt=False``)."""
    import torch

    mask = mask.clone()
    pad = mask.to(torch.int32).argmax(dim=1)  # leading pads (left padding)
    pos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    mask[pos < (pad + n).unsqueeze(1)] = 0
    return mask

