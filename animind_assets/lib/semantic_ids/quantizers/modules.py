"""Small building blocks: input normalisation, MLP encoder/decoder, gradient estimators.

Gradient estimators decide how the reconstruction gradient reaches the encoder through the
non-differentiable nearest-code lookup. Both return a tensor equal (in value) to the quantized
latent ``zq``:

* ``StraightThrough``: ``z + (zq - z).detach()`` -- the gradient w.r.t. ``zq`` is copied to ``z``.
* ``RotationTrick`` (Fifty et al. 2024, arXiv:2410.06424): ``zq = stop_grad(lambda * R) z`` where
  ``R`` is the rotation taking ``z``'s direction to ``zq``'s and ``lambda = |zq| / |z|``; the
  gradient w.r.t. ``z`` is the incoming gradient rotated/rescaled by ``lambda R^T``, so it keeps the
  angle information between the encoder output and its code. Implemented with the Householder
  form ``R = I - 2 w w^T + 2 v u^T`` (``u = z/|z|``, ``v = zq/|zq|``, ``w = (u+v)/|u+v|``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


class InputNormalizer(nn.Module):
    """Per-dimension standardisation (or centring) with statistics fitted once on training rows.

    The statistics are buffers, so they travel inside the checkpoint's ``state_dict``.
    """

    def __init__(self, dim: int, mode: str = "standardize", eps: float = 1e-6) -> None:
        super().__init__()
        if mode not in ("standardize", "center", "none"):
            raise ValueError(f"unknown input_norm {mode!r}")
        self.mode = mode
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        if self.mode == "none":
            return
        self.mean.copy_(x.mean(0))
        if self.mode == "standardize":
            self.std.copy_(x.std(0, unbiased=False).clamp_min(self.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        if self.mode == "center":
            return x - self.mean
        return (x - self.mean) / self.std


def mlp(dims: list[int], activation: str = "silu") -> nn.Sequential:
    """Linear layers through ``dims`` with the activation between them (none after the last)."""
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least input and output dims, got {dims}")
    act = _ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class StraightThrough(nn.Module):
    name = "ste"

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        return z + (zq - z).detach()


class RotationTrick(nn.Module):
    name = "rotation"

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        z_norm = z.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        q_norm = zq.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        u = (z / z_norm).detach()
        v = (zq / q_norm).detach()
        w = F.normalize(u + v, dim=-1, eps=self.eps).detach()
        rotated = z - 2.0 * (z * w).sum(-1, keepdim=True) * w + 2.0 * (z * u).sum(-1, keepdim=True) * v
        out = rotated * (q_norm / z_norm).detach()
        # exact value of zq (the rotation is exact up to rounding; u ~ -v is the degenerate case)
        return out + (zq - out).detach()


def make_estimator(name: str) -> nn.Module:
    if name == "ste":
        return StraightThrough()
    if name == "rotation":
        return RotationTrick()
    raise ValueError(f"unknown gradient estimator {name!r}")
