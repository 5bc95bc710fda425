"""Learning-rate multipliers shared by every trainer (``torch.optim.lr_scheduler.LambdaLR`` factors).

One owner for "linear warm-up, then constant or half-cosine decay": the quantizer trainer
(``semantic_ids.quantizers.trainer``), the sequence recommenders (``retrieval.seqtrain``: SASRec, RPG)
and TIGER (``retrieval.tiger``, which adds its own ``inverse_sqrt``) all call :func:`warmup_cosine`.
Cosine annealing: Loshchilov & Hutter, "SGDR", ICLR 2017.
"""

from __future__ import annotations

import math


def progress_after_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """Fraction in [0, 1] of the post-warm-up steps done at optimizer step ``step`` (0-based) of a run
    planned for ``total_steps`` steps, ``warmup_steps`` of them warm-up."""
    warm = max(0, int(warmup_steps))
    return min(1.0, max(0.0, (step - warm) / max(1, int(total_steps) - warm)))


def warmup_cosine(step: int, warmup_steps: int, progress: float | None, min_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step ``step`` (0-based).

    ``(step + 1) / warmup_steps`` while ``step < warmup_steps`` (linear warm-up; none when
    ``warmup_steps`` <= 0); afterwards ``1.0`` when ``progress`` is None (constant LR), else a half
    cosine from 1 down to ``min_ratio`` as ``progress`` goes 0 -> 1 (clipped to [0, 1]; progress may
    be a share of steps, :func:`progress_after_warmup`, or of a wall-clock budget)."""
    warm = max(0, int(warmup_steps))
    if warm and step < warm:
        return (step + 1) / warm
    if progress is None:
        return 1.0
    t = min(1.0, max(0.0, float(progress)))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
