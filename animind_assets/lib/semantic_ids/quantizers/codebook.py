"""One codebook (``K x D`` code vectors) plus its learning strategy and dead-code restarts.

Strategies (swappable, chosen by ``QuantizerConfig.codebook_update``):

* ``EMAUpdate``: the codebook is a buffer updated after each training forward pass with
  exponential moving averages of per-code assignment counts ``N_k`` and sums ``S_k`` of the vectors
  assigned to code ``k`` (van den Oord et al. 2017, Appendix A.1)::

      N_k <- decay * N_k + (1 - decay) * n_k
      S_k <- decay * S_k + (1 - decay) * sum_{i: code(i) = k} x_i
      N~_k = (N_k + eps) / (sum_j N_j + K * eps) * sum_j N_j      (Laplace smoothing)
      e_k  = S_k / N~_k

* ``GradientUpdate``: the codebook is an ``nn.Parameter`` trained by the optimizer through the
  VQ codebook loss ``|sg[x] - e_code(x)|^2``.

Dead-code restarts (``DeadCodeRestarter``): usage counts are accumulated over a window of
``window`` training steps; at the end of each window every code used fewer than ``min_usage`` times
in the *whole window* is re-seeded with a randomly drawn vector of the current step's inputs
(distinct rows while there are enough; its EMA statistics reset to that vector with count 1). A code unused in one batch but used
elsewhere in the window is left alone (the original AniMind tokenizer restarted every code unused
in the current batch, every batch, which keeps rare codes permanently unstable).
"""

from __future__ import annotations

import torch
from torch import nn

from animind_assets.lib.semantic_ids.quantizers.kmeans import nearest


class Codebook(nn.Module):
    def __init__(self, size: int, dim: int, trainable: bool, generator: torch.Generator | None = None) -> None:
        super().__init__()
        init = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.size = size
        self.dim = dim
        self.trainable = trainable
        if trainable:
            self.embed = nn.Parameter(init)
        else:
            self.register_buffer("embed", init)
        self.register_buffer("ema_count", torch.ones(size))
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("window_usage", torch.zeros(size))
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("restarts_total", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def set_vectors(self, vectors: torch.Tensor) -> None:
        if vectors.shape != (self.size, self.dim):
            raise ValueError(f"codebook init has shape {tuple(vectors.shape)}, expected {(self.size, self.dim)}")
        self.embed.data.copy_(vectors)
        self.ema_sum.copy_(vectors)
        self.ema_count.fill_(1.0)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code index for each row and the (differentiable w.r.t. the codebook) code vectors."""
        with torch.no_grad():
            idx, _ = nearest(x.detach().float(), self.embed.detach().float())
        return idx, self.embed[idx]


class EMAUpdate:
    name = "ema"
    trainable = False

    def __init__(self, decay: float = 0.99, eps: float = 1e-5) -> None:
        self.decay = decay
        self.eps = eps

    def codebook_loss(self, residual: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return residual.new_zeros(())

    @torch.no_grad()
    def update(self, cb: Codebook, inputs: torch.Tensor, codes: torch.Tensor) -> None:
        inputs = inputs.detach().float()
        counts = torch.bincount(codes, minlength=cb.size).to(inputs.dtype)
        sums = torch.zeros(cb.size, cb.dim, dtype=inputs.dtype, device=inputs.device).index_add_(0, codes, inputs)
        cb.ema_count.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        cb.ema_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = cb.ema_count.sum()
        smoothed = (cb.ema_count + self.eps) / (total + cb.size * self.eps) * total
        cb.embed.copy_(cb.ema_sum / smoothed.unsqueeze(1))


class GradientUpdate:
    name = "gradient"
    trainable = True

    def codebook_loss(self, residual: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return torch.mean((residual.detach().float() - quantized.float()) ** 2)

    def update(self, cb: Codebook, inputs: torch.Tensor, codes: torch.Tensor) -> None:
        return None


def make_update(name: str, decay: float = 0.99, eps: float = 1e-5):
    if name == "ema":
        return EMAUpdate(decay, eps)
    if name == "gradient":
        return GradientUpdate()
    raise ValueError(f"unknown codebook update strategy {name!r}")


class DeadCodeRestarter:
    """Windowed dead-code restarts (see module docstring)."""

    def __init__(self, window: int = 50, min_usage: float = 1.0, enabled: bool = True) -> None:
        if window < 1:
            raise ValueError("restart window must be >= 1 step")
        self.window = int(window)
        self.min_usage = float(min_usage)
        self.enabled = enabled

    @torch.no_grad()
    def observe(self, cb: Codebook, codes: torch.Tensor) -> None:
        cb.window_usage.add_(torch.bincount(codes, minlength=cb.size).to(cb.window_usage.dtype))

    @torch.no_grad()
    def end_step(self, cb: Codebook, candidates: torch.Tensor, generator: torch.Generator) -> int:
        """Count one training step; at the end of a window restart dead codes. Returns #restarted."""
        cb.window_steps.add_(1)
        if int(cb.window_steps) < self.window:
            return 0
        dead = cb.window_usage < self.min_usage
        n_dead = int(dead.sum())
        cb.window_usage.zero_()
        cb.window_steps.zero_()
        if not self.enabled or n_dead == 0 or candidates.shape[0] == 0:
            return 0
        candidates = candidates.detach().float()
        n = candidates.shape[0]
        if n_dead <= n:  # distinct rows, so restarted codes do not start as duplicates
            pick = torch.randperm(n, generator=generator)[:n_dead]
            new = candidates[pick]
        else:
            pick = torch.randint(n, (n_dead,), generator=generator)
            scale = 1e-2 * candidates.std().clamp_min(1e-6)
            new = candidates[pick] + scale * torch.randn(n_dead, candidates.shape[1], generator=generator)
        new = new.to(cb.embed.device, cb.embed.dtype)
        cb.embed.data[dead] = new
        cb.ema_sum[dead] = new
        cb.ema_count[dead] = 1.0
        cb.restarts_total.add_(n_dead)
        return n_dead
