"""Warm start of the new semantic-ID token embeddings: ridge projection from the quantizer codebooks (or
title centroids / mean), as in LC-Rec-style SID tokens (Zheng et al., ICDE 2024); or, for codebooks of
collaborative vectors (whose codes say little about the titles), a geometry-keeping random projection of
the codebooks into the token space (``mode="projection"``; CoLLM, Zhang et al. 2023, and LLaRA, Liao et al.
SIGIR 2024, map collaborative embeddings into the LM's token space with a learned projector; here the map is
a fixed seeded orthonormal one, so inner products between a level's code vectors are kept up to one scale)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from animind_assets.lib.llm.model_folder import (
    token_ids,
)
from animind_assets.lib.semantic_ids.tokens import SPECIAL_TOKENS, find_level_tokens, level_token, parse_level_token, sid_codes
from animind_assets.lib.semantic_ids.tokens import sid_tokens_used as sid_tokens_used
from animind_assets.lib.llm.finetune_config import LogFn, noop_log

# ---------------------------------------------------------------------------------------- warm start
def codebooks_from_checkpoint(src) -> list[np.ndarray]:
    """Per-quantizer-level code vectors from an AniMind quantizer checkpoint (``rqvae_model/model.pt``,
    ``torch.load(weights_only=True)`` dict). RQ-VAE: ``model_state['quantizer.codebooks.{i}.embed']``
    (one shared codebook when ``config.shared_codebook``); residual k-means: ``centroids``."""
    if isinstance(src, dict):
        payload = src
    else:
        from animind_assets.lib.common.checkpoint import require_finished
        from animind_assets.lib.semantic_ids.quantizers.checkpoint import load_checkpoint

        payload = load_checkpoint(src)
        require_finished(payload, src, what="quantizer")  # an interrupted run's codebooks are not used
    state = payload.get("model_state", payload)
    config = payload.get("config", {}) or {}
    levels = int(config.get("levels", 0) or 0)
    if "centroids" in state:
        cents = state["centroids"]
        return [cents[i].detach().float().numpy() for i in range(cents.shape[0])]
    books = {}
    for k, v in state.items():
        m = re.fullmatch(r"quantizer\.codebooks\.(\d+)\.embed", k)
        if m:
            books[int(m.group(1))] = v.detach().float().numpy()
    if not books:
        raise ValueError(f"no codebooks in checkpoint state (keys: {sorted(state)[:8]} ...)")
    if len(books) == 1 and levels > 1:
        return [books[0]] * levels
    return [books[i] for i in sorted(books)]


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
    return w, ym - xm @ w


def _text_mean_embeddings(tokenizer, emb: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    out = np.zeros((len(texts), emb.shape[1]), dtype=np.float64)
    for i, ids in enumerate(enc):
        ids = [t for t in ids if t < emb.shape[0]]
        out[i] = emb[ids].mean(0) if ids else emb.mean(0)
    return out


def _projection_vectors(codebooks: list[np.ndarray], sid_tokens: Sequence[str], dim: int, mu: np.ndarray, base_dev: float,
                       rng: np.random.Generator, out: dict[str, np.ndarray]) -> list[int]:
    """``mode="projection"``: the row of code ``c`` of level ``l`` = ``mu + s_l * Q_l (book_l[c] - mean_l)``.

    ``Q_l`` (dim, d_l) has orthonormal columns (QR of a seeded Gaussian matrix, a new one per level, so levels
    do not share directions), so the centred code vectors keep their inner products up to the scale ``s_l``,
    which gives the level's rows the vocabulary's mean distance from its mean (``base_dev``). Needs
    ``d_l <= dim``. Writes into ``out``; returns the 1-based levels written. Raises ``ValueError`` when a
    token's code is past its codebook."""
    wanted = find_level_tokens("".join(sid_tokens))
    used: list[int] = []
    for lv, book in enumerate(codebooks, start=1):
        book = np.asarray(book, dtype=np.float64)
        if book.ndim != 2 or book.shape[1] > dim:
            raise ValueError(f"level {lv} codebook of shape {book.shape} cannot be projected into {dim} dimensions")
        codes = sorted(c for (l, c) in wanted if l == lv)
        if not codes:
            continue
        if codes[-1] >= book.shape[0]:
            raise ValueError(f"level {lv} uses code {codes[-1]} but the codebook has {book.shape[0]} rows")
        q, _ = np.linalg.qr(rng.normal(size=(dim, book.shape[1])))
        centred = book[codes] - book.mean(0)
        proj = centred @ q.T
        dev = float(np.linalg.norm(proj, axis=1).mean()) or 1.0
        for c, v in zip(codes, proj):
            out[level_token(lv, c)] = mu + v * (base_dev / dev)
        used.append(lv)
    return used


@dataclass
class WarmStartStats:
    mode: str
    tokens: int
    levels_with_codebook: list[int]
    ridge_r2: dict[str, float]
    mean_norm_base: float
    mean_norm_new: float


@torch.no_grad()
def warm_start_embeddings(
    model,
    tokenizer,
    lookup: pl.DataFrame,
    sid_tokens: Sequence[str],
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    codebooks: list[np.ndarray] | None = None,
    mode: str = "rqvae",
    ridge_alpha: float = 1.0,
    n_base_rows: int | None = None,
    log: LogFn = noop_log,
) -> WarmStartStats:
    """Initialise the rows of ``sid_tokens`` and ``special_tokens`` (see module docstring).

    ``lookup`` needs anime_id, semantic_id, title (genres optional). Only rows past
    ``n_base_rows`` (default: the first added token) are written; the base vocabulary is untouched.
    Modes: ``rqvae`` (ridge from ``codebooks`` (level, codes, dim) to the title embeddings; centroids
    without codebooks), ``projection`` (``codebooks`` projected into the token space, geometry kept; for
    collaborative IDs), ``centroid``, ``mean``, ``none``. Levels without a vector (the disambiguation
    level) start at the numeral's embedding; ``rqvae`` and ``projection`` without codebooks fall back to
    ``centroid`` (logged; ``stats.mode`` says so). Raises ``ValueError`` when a code lies past its codebook.
    """
    emb_w = model.get_input_embeddings().weight
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight.data_ptr() == emb_w.data_ptr()
    all_new = list(sid_tokens) + list(special_tokens)
    ids = token_ids(tokenizer, all_new)
    n_base = n_base_rows if n_base_rows is not None else min(ids)
    base = emb_w[:n_base].detach().float().cpu().numpy().astype(np.float64)
    mu = base.mean(0)
    base_dev = np.linalg.norm(base - mu, axis=1).mean()
    rng = np.random.default_rng(0)
    new_vecs: dict[str, np.ndarray] = {}
    r2: dict[str, float] = {}
    used_cb: list[int] = []
    requested = mode
    if mode == "projection" and not codebooks:
        log("warm start: 'projection' without codebooks, using per-level centroids of the title embeddings")
        mode = "centroid"
    if mode == "projection" and sid_tokens:
        used_cb = _projection_vectors(codebooks, sid_tokens, base.shape[1], mu, base_dev, rng, new_vecs)
    if mode in ("rqvae", "centroid") and sid_tokens:
        sids = lookup["semantic_id"].to_list()
        codes = [sid_codes(s) for s in sids]
        n_levels = max(len(c) for c in codes)
        codes_arr = np.array([c + [0] * (n_levels - len(c)) for c in codes], dtype=np.int64)
        genres = lookup["genres"].to_list() if "genres" in lookup.columns else [None] * lookup.height
        texts = [f"{t}. {', '.join(g or [])}" for t, g in zip(lookup["title"].to_list(), genres)]
        target = _text_mean_embeddings(tokenizer, base, texts)
        resid = target - target.mean(0)
        wanted = set(find_level_tokens("".join(sid_tokens)))
        cb = codebooks if (mode == "rqvae" and codebooks) else None
        if mode == "rqvae" and not codebooks:
            log("warm start: no RQ-VAE codebooks available, using per-level centroids of the title embeddings")
        for lv in range(n_levels):
            level_codes = codes_arr[:, lv]
            level_vecs: dict[int, np.ndarray] = {}
            if cb is not None and lv < len(cb):
                book = np.asarray(cb[lv], dtype=np.float64)
                if level_codes.max() >= book.shape[0]:
                    raise ValueError(f"level {lv + 1} uses code {level_codes.max()} but the codebook has {book.shape[0]} rows")
                x = book[level_codes]
                w, b = _ridge(x, resid, ridge_alpha)
                pred = x @ w + b
                ss = ((resid - resid.mean(0)) ** 2).sum()
                r2[f"L{lv + 1}"] = float(1 - ((resid - pred) ** 2).sum() / ss) if ss > 0 else 0.0
                for c in np.unique(level_codes).tolist():
                    level_vecs[c] = book[c] @ w + b
                resid = resid - pred
                used_cb.append(lv + 1)
            elif cb is not None or lv < n_levels - 1 or mode == "centroid":
                # centroid of the residual per code (== ridge on one-hot codes with alpha -> 0)
                if cb is not None and lv == n_levels - 1:
                    level_vecs = {}
                else:
                    pred = np.zeros_like(resid)
                    for c in np.unique(level_codes).tolist():
                        m = level_codes == c
                        level_vecs[c] = resid[m].mean(0)
                        pred[m] = level_vecs[c]
                    resid = resid - pred
            # scale the level's vectors to the vocabulary's spread around its mean, add the mean
            if level_vecs:
                dev = np.mean([np.linalg.norm(v) for v in level_vecs.values()]) or 1.0
                for c, v in level_vecs.items():
                    if (lv + 1, c) in wanted:
                        new_vecs[level_token(lv + 1, c)] = mu + v * (base_dev / dev)
    if mode in ("rqvae", "centroid", "projection") and sid_tokens:
        # codes without a vector (disambiguation level with codebooks, unseen codes): numerals
        for tok in sid_tokens:
            if tok not in new_vecs:
                lv, c = parse_level_token(tok)
                num = _text_mean_embeddings(tokenizer, base, [f" {c}"])[0]
                new_vecs[tok] = num + rng.normal(0, 0.01 * base_dev / math.sqrt(base.shape[1]), base.shape[1])
    if mode == "mean" or (mode in ("rqvae", "centroid", "projection") and not sid_tokens):
        for tok in sid_tokens:
            new_vecs[tok] = mu + rng.normal(0, base_dev / math.sqrt(base.shape[1]), base.shape[1])
    elif mode == "none":
        log("warm start: none (new rows keep their resize initialisation)")
    if mode != "none" and special_tokens:
        words = [t.strip("<>").replace("_", " ") for t in special_tokens]
        for tok, vec in zip(special_tokens, _text_mean_embeddings(tokenizer, base, words)):
            new_vecs[tok] = vec
    for tok, vec in new_vecs.items():
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid < n_base:
            continue
        emb_w[tid] = torch.as_tensor(vec, dtype=emb_w.dtype)
        if out_emb is not None and not tied:
            out_emb.weight[tid] = torch.as_tensor(vec, dtype=out_emb.weight.dtype)
    new_rows = [tokenizer.convert_tokens_to_ids(t) for t in all_new]
    new_norm = float(emb_w[new_rows].float().norm(dim=1).mean()) if new_rows else 0.0
    stats = WarmStartStats(
        mode=requested if (requested not in ("rqvae", "projection") or codebooks) else "centroid (no codebooks)",
        tokens=len(new_vecs),
        levels_with_codebook=used_cb,
        ridge_r2=r2,
        mean_norm_base=float(np.linalg.norm(base, axis=1).mean()),
        mean_norm_new=new_norm,
    )
    log(f"warm start {stats.mode}: {stats.tokens} rows, ridge R2 {r2}, norm base {stats.mean_norm_base:.3f} new {new_norm:.3f}")
    return stats
