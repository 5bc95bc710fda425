"""The two quantizer models behind one small interface (``codes(x)``, ``kind``, ``state_dict``).

* ``RQVAE``: input normaliser -> MLP encoder -> ``ResidualQuantizer`` -> MLP decoder. Loss =
  reconstruction MSE (in normalised input space) + beta * commitment (+ codebook loss for gradient
  codebooks).
* ``ResidualKMeans``: RQ-KMeans. Inputs are centred and L2-normalised; level ``l`` runs k-means on
  the current residual (L2-normalised first when ``normalize_residuals``), subtracts the centroid,
  and passes the remainder on. Level 1 is seeded by kNN-constrained Ward clustering by default
  (``first_level_init="ward"``, see ``kmeans.ward_centroids``). Reconstruction uses the mean residual norm of each level as its
  scale: ``x^ = c_1 + s_1 (c_2 + s_2 (c_3 + ...))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from animind_assets.lib.semantic_ids.quantizers.config import QuantizerConfig
from animind_assets.lib.semantic_ids.quantizers.kmeans import kmeans, nearest
from animind_assets.lib.semantic_ids.quantizers.modules import InputNormalizer, mlp
from animind_assets.lib.semantic_ids.quantizers.quantizer import QuantizerOutput, ResidualQuantizer


class RQVAE(nn.Module):
    kind = "rqvae"

    def __init__(self, input_dim: int, cfg: QuantizerConfig) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.normalizer = InputNormalizer(input_dim, cfg.input_norm)
        enc = [input_dim, *cfg.hidden_dims, cfg.latent_dim]
        dec_hidden = cfg.decoder_hidden_dims if cfg.decoder_hidden_dims is not None else list(reversed(cfg.hidden_dims))
        dec = [cfg.latent_dim, *dec_hidden, input_dim]
        self.encoder = mlp(enc, cfg.activation)
        self.decoder = mlp(dec, cfg.activation)
        self.quantizer = ResidualQuantizer(
            levels=cfg.levels,
            codebook_size=cfg.codebook_size,
            dim=cfg.latent_dim,
            shared=cfg.shared_codebook,
            update=cfg.codebook_update,
            estimator=cfg.estimator,
            ema_decay=cfg.ema_decay,
            ema_eps=cfg.ema_eps,
            restart_window=cfg.restart_window,
            restart_min_usage=cfg.restart_min_usage,
            restart_dead_codes=cfg.restart_dead_codes,
            seed=cfg.seed,
        )
        self.beta = cfg.beta

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalizer(x))

    def forward(self, x: torch.Tensor, autocast=None) -> tuple[dict[str, torch.Tensor], QuantizerOutput]:
        xn = self.normalizer(x)
        ctx = autocast if autocast is not None else _null()
        with ctx:
            z = self.encoder(xn)
        q = self.quantizer(z.float())
        with ctx:
            xr = self.decoder(q.zq)
        recon = F.mse_loss(xr.float(), xn.float())
        loss = recon + self.beta * q.commit_loss + q.codebook_loss
        return {"loss": loss, "recon": recon, "commit": q.commit_loss, "codebook": q.codebook_loss}, q

    @torch.no_grad()
    def codes(self, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        was = self.training
        self.eval()
        out = []
        for s in range(0, x.shape[0], batch_size):
            out.append(self.quantizer(self.encode(x[s : s + batch_size]).float()).codes)
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.quantizer.levels, dtype=torch.long)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, batch_size: int = 8192) -> dict:
        """Losses, codes and residual norms on ``x`` (eval mode, no codebook updates)."""
        was = self.training
        self.eval()
        tot = {"loss": 0.0, "recon": 0.0, "commit": 0.0, "codebook": 0.0}
        codes, norms = [], None
        n = x.shape[0]
        for s in range(0, n, batch_size):
            xb = x[s : s + batch_size]
            losses, q = self.forward(xb)
            w = xb.shape[0] / max(n, 1)
            for k in tot:
                tot[k] += float(losses[k]) * w
            codes.append(q.codes)
            rn = [v * w for v in q.residual_norms]
            norms = rn if norms is None else [a + b for a, b in zip(norms, rn)]
        self.train(was)
        tot["codes"] = torch.cat(codes) if codes else torch.zeros(0, self.quantizer.levels, dtype=torch.long)
        tot["residual_norms"] = norms or []
        return tot


class ResidualKMeans(nn.Module):
    kind = "rqkmeans"

    def __init__(self, input_dim: int, cfg: QuantizerConfig) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.levels = cfg.levels
        self.codebook_size = cfg.codebook_size
        self.normalize_residuals = cfg.normalize_residuals
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("centroids", torch.zeros(cfg.levels, cfg.codebook_size, input_dim))
        self.register_buffer("scales", torch.ones(cfg.levels))

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float() - self.mean, dim=1)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, iters: int = 25, seed: int = 0, log=None) -> list[float]:
        self.mean.copy_(x.float().mean(0))
        r = self._prep(x)
        inertias = []
        for level in range(self.levels):
            if self.normalize_residuals:
                r = F.normalize(r, dim=1)
            res = kmeans(r, self.codebook_size, seed=seed + level, **level_kmeans_args(self.cfg, level, iters))
            self.centroids[level].copy_(res.centroids)
            inertias.append(res.inertia)
            r = r - res.centroids[res.assignments]
            self.scales[level] = r.norm(dim=1).mean()
            if log:
                log(f"RQ-KMeans level {level + 1}/{self.levels}: inertia {res.inertia:.5f}, {res.iterations} iterations")
        return inertias

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[float], torch.Tensor]:
        r = self._prep(x)
        target = r
        codes, norms = [], []
        for level in range(self.levels):
            norms.append(float(r.norm(dim=1).mean()) if r.shape[0] else 0.0)
            if self.normalize_residuals:
                r = F.normalize(r, dim=1)
            idx, _ = nearest(r, self.centroids[level])
            codes.append(idx)
            r = r - self.centroids[level][idx]
        c = torch.stack(codes, 1)
        return c, norms, target

    @torch.no_grad()
    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(codes.shape[0], self.input_dim)
        for level in reversed(range(self.levels)):
            c = self.centroids[level][codes[:, level]]
            out = c + (self.scales[level] * out if self.normalize_residuals else out)
        return out

    @torch.no_grad()
    def codes(self, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        out = [self._run(x[s : s + batch_size])[0] for s in range(0, x.shape[0], batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.levels, dtype=torch.long)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, batch_size: int = 8192) -> dict:
        codes, norms = self._run(x)[:2]
        target = self._prep(x)
        recon = float(F.mse_loss(self.reconstruct(codes), target))
        return {"loss": recon, "recon": recon, "commit": 0.0, "codebook": 0.0, "codes": codes, "residual_norms": norms}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def level_kmeans_args(cfg: QuantizerConfig, level: int, iters: int) -> dict:
    """k-means arguments of one level: level 1 may be Ward-seeded (``cfg.first_level_init``)."""
    if level == 0 and cfg.first_level_init == "ward":
        return {"init": "ward", "iters": cfg.first_level_iters, "ward_neighbors": cfg.ward_neighbors, "ward_max_rows": cfg.ward_max_rows}
    return {"init": "kmeans++", "iters": iters}


def build_model(input_dim: int, cfg: QuantizerConfig) -> nn.Module:
    if cfg.quantizer == "rqvae":
        return RQVAE(input_dim, cfg)
    if cfg.quantizer == "rqkmeans":
        return ResidualKMeans(input_dim, cfg)
    raise ValueError(f"unknown quantizer {cfg.quantizer!r}")
