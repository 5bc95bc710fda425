"""Residual vector quantizer: ``levels`` codebooks applied to successive residuals.

``r_1 = z``; at level ``l`` the nearest code ``c_l = argmin_k |r_l - e_k|`` is chosen,
``q_l = e_{c_l}`` and ``r_{l+1} = r_l - q_l``. The quantized latent is ``sum_l q_l``; the encoder
receives gradients through the configured estimator (straight-through or rotation trick).
Losses: commitment ``sum_l |r_l - sg[q_l]|^2`` (scaled by beta in the model) and, for gradient
codebooks, the codebook loss ``sum_l |sg[r_l] - q_l|^2``.

Per-level codebooks by default; ``shared=True`` uses one codebook for all levels (EMA statistics
then pool the inputs of every level, as in the original AniMind tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from animind_assets.lib.semantic_ids.quantizers.codebook import Codebook, DeadCodeRestarter, make_update
from animind_assets.lib.semantic_ids.quantizers.kmeans import kmeans
from animind_assets.lib.semantic_ids.quantizers.modules import make_estimator


@dataclass
class QuantizerOutput:
    zq: torch.Tensor  # quantized latent carrying the estimator's gradient path
    codes: torch.Tensor  # (B, levels) int64
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    residual_norms: list[float] = field(default_factory=list)  # mean |r_l| per level
    level_inputs: list[torch.Tensor] = field(default_factory=list)  # detached r_l per level


class ResidualQuantizer(nn.Module):
    def __init__(
        self,
        levels: int,
        codebook_size: int,
        dim: int,
        shared: bool = False,
        update: str = "ema",
        estimator: str = "ste",
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        restart_window: int = 50,
        restart_min_usage: float = 1.0,
        restart_dead_codes: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.levels = levels
        self.codebook_size = codebook_size
        self.dim = dim
        self.shared = shared
        self.update = make_update(update, ema_decay, ema_eps)
        self.estimator = make_estimator(estimator)
        self.restarter = DeadCodeRestarter(restart_window, restart_min_usage, restart_dead_codes)
        g = torch.Generator().manual_seed(int(seed))
        n_books = 1 if shared else levels
        self.codebooks = nn.ModuleList(
            [Codebook(codebook_size, dim, trainable=self.update.trainable, generator=g) for _ in range(n_books)]
        )

    def codebook(self, level: int) -> Codebook:
        return self.codebooks[0 if self.shared else level]

    # -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, iters: int = 20, seed: int = 0, log=None, first_level: dict | None = None) -> list[float]:
        """Initialise codebooks by k-means on the residuals, level by level. Returns inertias.

        With a shared codebook the single codebook is fitted on the level-1 residuals (the inputs
        of later levels only exist once a codebook does). ``first_level`` overrides the k-means
        arguments of level 1 (e.g. ``{"init": "ward", "iters": 0}``).
        """
        residual = z.detach().float()
        inertias = []
        for level in range(self.levels if not self.shared else 1):
            args = dict(first_level) if (level == 0 and first_level) else {"iters": iters}
            res = kmeans(residual, self.codebook_size, seed=seed + level, **args)
            self.codebook(level).set_vectors(res.centroids)
            inertias.append(res.inertia)
            if log:
                log(f"k-means init level {level + 1}: inertia {res.inertia:.5f} after {res.iterations} iterations")
            residual = residual - res.centroids[res.assignments]
        return inertias

    # -------------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        z = z.float()
        residual = z
        zq_sum = torch.zeros_like(z)
        commit = z.new_zeros(())
        cb_loss = z.new_zeros(())
        codes, norms, inputs = [], [], []
        for level in range(self.levels):
            cb = self.codebook(level)
            inputs.append(residual.detach())
            norms.append(float(residual.detach().norm(dim=1).mean()) if residual.shape[0] else 0.0)
            idx, q = cb.lookup(residual)
            codes.append(idx)
            commit = commit + torch.mean((residual - q.detach()) ** 2)
            cb_loss = cb_loss + self.update.codebook_loss(residual, q)
            zq_sum = zq_sum + q
            residual = residual - q.detach()
        codes_t = torch.stack(codes, dim=1) if codes else torch.zeros(z.shape[0], 0, dtype=torch.long)
        # codebooks learn from EMA or from the codebook loss; the decoder path reaches only the encoder
        zq = self.estimator(z, zq_sum.detach())
        return QuantizerOutput(zq, codes_t, commit, cb_loss, norms, inputs)

    # -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def after_forward(self, out: QuantizerOutput) -> None:
        """Training-time bookkeeping for one micro-batch: EMA updates and usage counting."""
        groups: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for level in range(self.levels):
            key = 0 if self.shared else level
            xs, cs = groups.setdefault(key, ([], []))
            xs.append(out.level_inputs[level])
            cs.append(out.codes[:, level])
        for key, (xs, cs) in groups.items():
            cb = self.codebooks[key]
            x = torch.cat(xs)
            c = torch.cat(cs)
            self.update.update(cb, x, c)
            self.restarter.observe(cb, c)

    @torch.no_grad()
    def end_step(self, out: QuantizerOutput, generator: torch.Generator) -> int:
        """Once per optimizer step: advance usage windows and restart dead codes."""
        restarted = 0
        for key, cb in enumerate(self.codebooks):
            if self.shared:
                cand = torch.cat(out.level_inputs)
            else:
                cand = out.level_inputs[key]
            restarted += self.restarter.end_step(cb, cand, generator)
        return restarted
