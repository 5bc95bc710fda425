"""RPG: parallel prediction of long, unordered semantic IDs (Hou et al., "Generating Long Semantic IDs
in Parallel for Recommendation", KDD 2025).

Every item has ``m`` codes (``pq.product_quantize``: OPQ/PQ, codebook ``j`` has ``K`` codes). One
embedding table holds ``m * K`` code embeddings (codebook ``j`` code ``c`` -> row ``j*K + c``).

* Item representation: the **mean of its m code embeddings** (no item-ID embedding at all).
* Backbone: learned positions + dropout + ``layers`` pre-LayerNorm causal self-attention blocks
  (GPT-2 style) + final LayerNorm over the user's item representations.
* Output: for every codebook ``j`` a residual head ``z_j = h + SiLU(W_j h + b_j)`` (``W_j`` zero-
  initialised); ``logits_j = cos(z_j, E_j[c]) / temperature`` over the K codes of codebook ``j``
  (``E_j`` = the same code embeddings as the input). All ``m`` codes of the next item are predicted
  at once, one softmax per codebook; the loss is the mean of the ``m`` cross-entropies.
* Scoring (exact, every item): ``score(item) = sum_j log softmax(logits_j)[code_j(item)]``, computed
  as one sparse (CSR) (N, m*K) x (m*K, B) product. (The paper decodes with a graph over IDs to avoid scoring
  all items; with 12k items exact scoring is cheap and needs no approximation.)

Options that are not in the paper (off by default in ``RPGConfig``; the Beauty benchmark's default turns
them on, docs/beauty.md fifth round): ``item_loss_weight`` / ``code_loss_weight`` (an exact item-level
softmax over the summed code log-probabilities, alone or beside the code cross-entropy; with raw logits
the per-codebook log-normalisers cancel, so it is one ``item_code_sums`` product), ``logits="dot"``
(unnormalised code logits) and ``pooling="sqrt"`` (sum of the code embeddings / sqrt(m)).

Public API: ``RPGConfig``, ``RPG``, ``train_rpg(split, codes, cfg) -> SeqTrainResult``,
``save_rpg``/``load_rpg``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from animind_assets.lib.retrieval.evaluation import SequenceSplit
from animind_assets.lib.retrieval.seqtrain import (
    ModelConfigMixin,
    read_model_folder,
    write_model_folder,
    CausalBlock,
    LogFn,
    SeqTrainConfig,
    SeqTrainResult,
    padded_causal_mask,
    train_sequence_model,
)


@dataclass
class RPGConfig(ModelConfigMixin):
    """Model knobs (RPG's Beauty config: hidden 448, 2 layers, 4 heads, ff 1024, embedding and
    attention dropout 0.5, temperature 0.03, 32 codebooks x 256); training knobs in ``train``."""

    hidden: int = 256
    layers: int = 2
    heads: int = 4
    d_ff: int = 1024
    emb_dropout: float = 0.5
    attn_dropout: float = 0.5
    resid_dropout: float = 0.0
    temperature: float = 0.03
    pooling: str = "mean"  # item representation from its m code embeddings: "mean" (RPG) or "sqrt" (sum / sqrt(m): keeps the embeddings' scale, so at init items are not 1/sqrt(m) smaller than positions; not in the paper)
    logits: str = "cosine"  # "cosine": cos(z_j, E_j[c]) / temperature (RPG); "dot": z_j . E_j[c] (unnormalised, so code-embedding norms can carry popularity; not in the paper)
    code_loss_weight: float = 1.0  # weight of RPG's loss (mean code cross-entropy); 0 = train on the item-level loss only (needs item_loss_weight > 0)
    item_loss_weight: float = 0.0  # 0 = RPG's loss (code cross-entropies only); >0 adds this x an item-level softmax on the mean code log-probs (RPG.item_loss; exact or sampled, see item_negatives; not in the paper)
    item_negatives: int = 1024  # uniformly sampled negative items per batch (shared by its positions) of the item-level loss; 0 = exact softmax over all items
    item_loss_positions: int = 0  # target positions per batch (drawn at random) that get the item-level loss; 0 = all
    distill_weight: float = 0.0  # alpha in [0, 1]: the exact item-level loss's target becomes (1 - alpha) one-hot + alpha softmax(teacher logits / distill_temperature) (knowledge distillation, Hinton et al. 2015; teacher via train_rpg(teacher=...); not in the paper)
    distill_temperature: float = 1.0  # softmax temperature of the teacher's item logits
    train: SeqTrainConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.train is None:
            # lr 1e-2 = RPG's Beauty setting; at 3e-3 training stayed near the code-frequency loss for 11 epochs
            self.train = SeqTrainConfig(lr=1e-2, batch_size=128, patience=5, warmup_steps=100)
        elif isinstance(self.train, dict):
            self.train = SeqTrainConfig.from_dict(self.train)

    def validate(self) -> RPGConfig:
        if self.hidden < 1 or self.layers < 1 or self.heads < 1 or self.d_ff < 1:
            raise ValueError("RPGConfig.hidden, layers, heads and d_ff must be >= 1")
        if self.pooling not in ("mean", "sqrt"):
            raise ValueError(f"RPGConfig.pooling must be 'mean' or 'sqrt', got {self.pooling!r}")
        if self.logits not in ("cosine", "dot"):
            raise ValueError(f"RPGConfig.logits must be 'cosine' or 'dot', got {self.logits!r}")
        if self.temperature <= 0:
            raise ValueError(f"RPGConfig.temperature must be > 0, got {self.temperature}")
        if self.item_loss_weight < 0 or self.item_negatives < 0 or self.item_loss_positions < 0 or self.code_loss_weight < 0:
            raise ValueError("RPGConfig.code_loss_weight, item_loss_weight, item_negatives and item_loss_positions must be >= 0")
        if not 0.0 <= self.distill_weight <= 1.0 or self.distill_temperature <= 0:
            raise ValueError(f"RPGConfig.distill_weight must be in [0, 1] and distill_temperature > 0, got "
                             f"{self.distill_weight}, {self.distill_temperature}")
        if self.distill_weight > 0 and (self.item_loss_weight == 0 or self.item_negatives != 0):
            raise ValueError("RPGConfig.distill_weight > 0 needs the exact item-level loss (item_loss_weight > 0, item_negatives = 0)")
        if self.code_loss_weight == 0 and self.item_loss_weight == 0:
            raise ValueError("RPGConfig: code_loss_weight and item_loss_weight are both 0: nothing to train")
        self.train.validate()
        return self




def item_code_matrix(codes: torch.Tensor, codebook_size: int, value: float = 1.0) -> torch.Tensor:
    """Sparse CSR (n, m*K) float32 matrix with ``value`` at (item row, j*K + code_j) for each of the
    ``m`` codes of each row of ``codes`` (n, m) int64 in ``0..K-1`` (on ``codes``' device), so that
    ``matrix @ log_probs.T`` ((m*K, B) per-code log-probabilities) sums each item's code log-probabilities
    (x ``value``). Each row's columns are already sorted (codebook offsets increase), so it is built as
    CSR directly."""
    n, m = codes.shape
    cols = (codes + torch.arange(m, device=codes.device) * codebook_size).reshape(-1)
    crow = torch.arange(0, n * m + 1, m, device=codes.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, torch.full((n * m,), float(value), device=codes.device),
                                       (n, m * codebook_size))

def _sparse_rows_times(matrix: torch.Tensor, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``(matrix @ x.T).T`` for a sparse CSR ``matrix`` (R, C) and a dense ``x`` (M, C) -> (M, R) float32,
    in blocks of ``chunk`` rows of ``x``: a block of x.T (C, 64) stays in the CPU cache, which makes the
    product ~4x faster than one (R, C) x (C, M) call for M ~ 1,000 (measured: 0.085 s vs 0.34 s, 12,101 x 8,192,
    387k non-zeros, 1,248 rows, one thread)."""
    out = torch.empty(x.shape[0], matrix.shape[0], dtype=x.dtype, device=x.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        for i in range(0, x.shape[0], chunk):
            out[i:i + chunk] = (matrix @ x[i:i + chunk].T.contiguous()).T
    return out


class _CodeSum(torch.autograd.Function):
    """(M, m*K) per-code values -> (M, N) per-item sums over the item's m codes; the backward uses the
    transposed CSR matrix built once (autograd's own sparse backward transposes on every call and is
    ~2x slower)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, matrix: torch.Tensor, matrix_t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.matrix_t = matrix_t
        return _sparse_rows_times(matrix, values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _sparse_rows_times(ctx.matrix_t, grad.contiguous()), None, None


def item_code_sums(values: torch.Tensor, matrix: torch.Tensor, matrix_t: torch.Tensor) -> torch.Tensor:
    """Differentiable ``values (M, m*K) -> (M, N)``: ``out[p, i] = sum_j values[p, j*K + code_j(i)]``, with
    ``matrix`` = :func:`item_code_matrix` (N, m*K) and ``matrix_t`` its transpose as CSR (m*K, N)."""
    return _CodeSum.apply(values, matrix, matrix_t)


class RPG(torch.nn.Module):
    """RPG over items ``0..N-1`` with ``codes`` (N, m) int in ``0..codebook_size-1``."""

    def __init__(self, codes: np.ndarray, codebook_size: int, cfg: RPGConfig) -> None:
        super().__init__()
        cfg.validate()
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] == 0:
            raise ValueError(f"codes must be a non-empty (N, m) matrix, got shape {codes.shape}")
        if codes.min() < 0 or codes.max() >= codebook_size:
            raise ValueError(f"codes must be in 0..{codebook_size - 1}, got range {codes.min()}..{codes.max()}")
        self.cfg = cfg
        self.n_items, self.m = codes.shape
        self.k = int(codebook_size)
        self.max_len = cfg.train.max_len
        d = cfg.hidden
        flat = codes + np.arange(self.m)[None, :] * self.k  # (N, m) rows of the code table
        self.register_buffer("codes", torch.from_numpy(codes), persistent=True)
        # row 0 = padding token (its mean embedding is masked to 0)
        self.register_buffer("token_codes", torch.from_numpy(np.vstack([np.zeros((1, self.m), np.int64), flat])), persistent=False)
        self.code_emb = torch.nn.Embedding(self.m * self.k, d)
        self.pos_emb = torch.nn.Embedding(self.max_len, d)
        self.emb_drop = torch.nn.Dropout(cfg.emb_dropout)
        self.blocks = torch.nn.ModuleList(
            CausalBlock(d, cfg.heads, cfg.d_ff, cfg.attn_dropout, cfg.resid_dropout, activation="gelu") for _ in range(cfg.layers)
        )
        self.final_ln = torch.nn.LayerNorm(d, eps=1e-12)
        self.head_w = torch.nn.Parameter(torch.zeros(self.m, d, d))
        self.head_b = torch.nn.Parameter(torch.zeros(self.m, d))
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("head_") and "ln" not in name:
                torch.nn.init.normal_(p, std=0.02)
        self._onehot: tuple[torch.Tensor, torch.Tensor] | None = None
        self._teacher = None  # distillation teacher (a plain callable, so it is never part of the state dict)

    def set_teacher(self, teacher) -> None:
        """Distillation teacher for ``distill_weight > 0``: ``teacher(inputs (B, L) tokens, valid (B, L) bool)
        -> (M, N) float next-item logits`` at the valid positions, in ``h[valid]`` order, without gradients
        (e.g. ``SASRec.position_logits`` of a trained SASRec in eval mode). ``None`` removes it."""
        self._teacher = teacher

    # ------------------------------------------------------------------ model
    def item_repr(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) item tokens (id + 1, 0 = pad) -> (B, L, d) mean code embeddings (``pooling="sqrt"``: their
        sum / sqrt(m)); 0 at padding."""
        emb = self.code_emb(self.token_codes[tokens])
        rep = emb.mean(-2) if self.cfg.pooling == "mean" else emb.sum(-2) * self.m ** -0.5
        return rep * (tokens > 0).unsqueeze(-1)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        b, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"sequence length {length} > max_len {self.max_len}")
        pad = (tokens > 0).unsqueeze(-1).float()
        pos = torch.arange(self.max_len - length, self.max_len, device=tokens.device)
        x = self.emb_drop(self.item_repr(tokens) + self.pos_emb(pos).unsqueeze(0)) * pad
        mask = padded_causal_mask(tokens, self.cfg.heads)
        for blk in self.blocks:
            x = blk(x, mask) * pad
        return self.final_ln(x)

    def code_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(M, d) hidden states -> (M, m, K) logits, one softmax per codebook: ``cos(z_j, E_j[c]) / temperature``
        (RPG) or, with ``logits="dot"``, ``z_j . E_j[c]``."""
        z = h.unsqueeze(1) + F.silu(torch.einsum("bd,mde->bme", h, self.head_w) + self.head_b)
        if self.cfg.logits == "dot":
            return torch.einsum("bmd,mkd->bmk", z, self.code_emb.weight.view(self.m, self.k, -1))
        z = F.normalize(z, dim=-1) * (1.0 / self.cfg.temperature)  # scale (M, m, d) rather than the (M, m, K) logits
        table = F.normalize(self.code_emb.weight, dim=-1).view(self.m, self.k, -1)
        return torch.einsum("bmd,mkd->bmk", z, table)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``code_loss_weight`` x the mean over positions with a target and over the m codebooks of the code
        cross-entropy (RPG's loss; skipped when that weight is 0), plus ``item_loss_weight`` x :meth:`item_loss` when that weight is > 0 (on
        ``item_loss_positions`` target positions drawn at random from the batch when that is > 0 and smaller than
        the batch's number of target positions; otherwise on all of them)."""
        h = self.hidden_states(inputs)
        valid = targets > 0
        logits = self.code_logits(h[valid])  # (M, m, K)
        tgt_items = targets[valid] - 1
        tgt = self.codes[tgt_items]  # (M, m)
        loss = logits.new_zeros(())
        if self.cfg.code_loss_weight > 0:
            loss = self.cfg.code_loss_weight * F.cross_entropy(logits.reshape(-1, self.k), tgt.reshape(-1))
        if self.cfg.item_loss_weight > 0:
            teacher = None
            if self.cfg.distill_weight > 0:
                if self._teacher is None:
                    raise ValueError("RPGConfig.distill_weight > 0 needs a teacher: RPG.set_teacher / train_rpg(teacher=...)")
                with torch.no_grad():
                    teacher = self._teacher(inputs, valid).to(logits.device)
            n_pos = self.cfg.item_loss_positions
            if 0 < n_pos < len(tgt_items):
                pick = torch.randperm(len(tgt_items), device=logits.device)[:n_pos]
                logits, tgt_items = logits[pick], tgt_items[pick]
                teacher = teacher[pick] if teacher is not None else None
            loss = loss + self.cfg.item_loss_weight * self.item_loss(logits, tgt_items, teacher)
        return loss

    def item_loss(self, logits: torch.Tensor, tgt_items: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Item-level softmax cross-entropy on the scores the model ranks by.

        ``logits`` (M, m, K) code logits, ``tgt_items`` (M,) int64 item ids. An item's score is the mean
        of its codes' log-probabilities (:meth:`score` / m: the same ranking). With ``item_negatives`` = 0
        the softmax is **exact, over all N items**: the per-codebook log-normalisers are the same for every
        item of a position, so the item logits are the mean raw code logits of the item's codes
        (:func:`item_code_sums`; ~0.35 s forward + backward for 1,248 positions x 12,101 items x 32 codebooks
        on one CPU thread). With ``item_negatives`` = S
        > 0 the target competes with S items drawn uniformly for the whole batch (a negative equal to a
        position's target is masked; uniform sampling needs no log-Q correction). This is not in the RPG
        paper (its loss is the code cross-entropy only); it trains the summed score directly, as SASRec
        with a full (or sampled) softmax does.

        ``teacher_logits`` (M, N) (exact loss only): the target distribution becomes ``(1 - a) one_hot(target)
        + a softmax(teacher_logits / T)`` with ``a = distill_weight``, ``T = distill_temperature`` (knowledge
        distillation, Hinton et al., "Distilling the Knowledge in a Neural Network", 2015). Returns a scalar."""
        if self.cfg.item_negatives == 0:
            scores = item_code_sums(logits.reshape(len(tgt_items), -1), *self._item_code_matrices(logits.device)) / self.m
            if teacher_logits is None:
                return F.cross_entropy(scores, tgt_items)
            a = self.cfg.distill_weight
            target = a * torch.softmax(teacher_logits.float() / self.cfg.distill_temperature, dim=1)
            target[torch.arange(len(tgt_items), device=target.device), tgt_items] += 1.0 - a
            return F.cross_entropy(scores, target)
        if teacher_logits is not None:
            raise ValueError("distillation needs the exact item-level loss (item_negatives = 0)")
        logp = F.log_softmax(logits, dim=-1)  # (M, m, K)
        pos = logp.gather(2, self.codes[tgt_items].unsqueeze(-1)).squeeze(-1).mean(-1)  # (M,)
        neg_items = torch.randint(0, self.n_items, (self.cfg.item_negatives,), device=logits.device)
        onehot = item_code_matrix(self.codes[neg_items], self.k, 1.0 / self.m)  # (S, m*K)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            neg = (onehot @ logp.reshape(len(pos), -1).T).T  # (M, S): mean code log-prob of each negative
        neg = neg.masked_fill(neg_items.unsqueeze(0) == tgt_items.unsqueeze(1), float("-inf"))
        scores = torch.cat([pos.unsqueeze(1), neg], dim=1)
        return F.cross_entropy(scores, torch.zeros(len(pos), dtype=torch.long, device=logits.device))

    def code_log_probs(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, m, K) log-probabilities of every code of the next item."""
        h = self.hidden_states(inputs)[:, -1]
        return F.log_softmax(self.code_logits(h).float(), dim=-1)

    def _item_code_matrices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # CSR: ~15x faster than COO for this (N, m*K) @ (m*K, B) product on CPU (0.7 s vs 11 s for 512 users)
        if self._onehot is None or self._onehot[0].device != device:
            a = item_code_matrix(self.codes.to(device), self.k)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self._onehot = (a, a.to_sparse_coo().t().coalesce().to_sparse_csr())
        return self._onehot

    @torch.no_grad()
    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, N) float32: sum over codebooks of the log-prob of each item's code."""
        logp = self.code_log_probs(inputs).reshape(inputs.shape[0], -1)  # (B, m*K)
        return _sparse_rows_times(self._item_code_matrices(logp.device)[0], logp)


def train_rpg(split: SequenceSplit, codes: np.ndarray, codebook_size: int, cfg: RPGConfig, log: LogFn | None = None,
              on_eval=None, teacher=None) -> SeqTrainResult:
    """Build and train an RPG on ``split`` with item codes ``codes`` (N, m); ``N`` must equal
    ``split.n_items`` (row i = item id i). ``teacher``: a trained item-level model with
    ``position_logits(inputs, valid)`` over the same N items (e.g. ``SASRec``), used when
    ``cfg.distill_weight > 0``; it is put in eval mode and moved to the training device (both stay so
    afterwards) and is never trained or saved. Raises ``ValueError`` for mismatched codes, a missing teacher,
    a teacher over another item count or with a shorter ``max_len``."""
    cfg.validate()
    if len(codes) != split.n_items:
        raise ValueError(f"codes has {len(codes)} rows but the split has {split.n_items} items")
    if cfg.distill_weight > 0 and teacher is None:
        raise ValueError("RPGConfig.distill_weight > 0 needs a teacher model (train_rpg(teacher=...))")
    torch.manual_seed(cfg.train.seed)
    model = RPG(codes, codebook_size, cfg)
    if teacher is not None and cfg.distill_weight > 0:
        if getattr(teacher, "n_items", split.n_items) != split.n_items:
            raise ValueError(f"teacher scores {teacher.n_items} items but the split has {split.n_items}")
        if getattr(teacher, "max_len", cfg.train.max_len) < cfg.train.max_len:
            raise ValueError(f"teacher max_len {teacher.max_len} < RPG max_len {cfg.train.max_len}")
        teacher.eval()  # no dropout; position_logits runs without gradients

        def teach(inputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            teacher.to(inputs.device)
            return teacher.position_logits(inputs, valid)

        model.set_teacher(teach)
    try:
        return train_sequence_model(model, split, cfg.train, name="rpg", log=log, on_eval=on_eval)
    finally:
        model.set_teacher(None)


def save_rpg(model: RPG, dest: str, extra: dict[str, Any] | None = None) -> str:
    """Folder with ``weights.pt`` (incl. the codes) + ``config.json`` (+ ``extra.json``), atomic."""
    conf = {"n_items": model.n_items, "n_codebooks": model.m, "codebook_size": model.k, **model.cfg.to_dict()}
    return write_model_folder(model.state_dict(), conf, dest, extra)


def load_rpg(src: str, map_location: str = "cpu") -> tuple[RPG, dict[str, Any]]:
    """-> (model in eval mode, extra). ``torch.load(weights_only=True)``."""
    state, conf, extra = read_model_folder(src, map_location)
    n, m, k = int(conf.pop("n_items")), int(conf.pop("n_codebooks")), int(conf.pop("codebook_size"))
    codes = state["codes"].cpu().numpy()
    if codes.shape != (n, m):
        raise ValueError(f"{src}: codes shape {codes.shape} != ({n}, {m})")
    model = RPG(codes, k, RPGConfig.from_dict(conf))
    model.load_state_dict(state)
    model.eval()
    return model, extra


def marginal_code_log_probs(item_scores: torch.Tensor, codes: np.ndarray | torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Per-codebook marginals of an item-level model: (B, N) item scores (logits, e.g. SASRec's) ->
    (B, m, K) float32 ``log sum_{i: code_j(i) = c} softmax(scores)_i``; ``codes`` (N, m) int in
    ``0..K-1`` (not range-checked: a code >= K would land in the next codebook's slot). A code no item
    uses gets log(1e-30). CPU tensors (as ``seqtrain.make_scorer`` returns); memory O(B * N * m) for the
    (B, N*m) intermediate. Raises ``ValueError`` unless ``item_scores`` is (B, N). Used to ask what
    RPG's scoring family (summed code log-probabilities) reaches when its per-codebook distributions are
    those of another model."""
    codes_t = torch.as_tensor(np.asarray(codes), dtype=torch.long)
    n, m = codes_t.shape
    if item_scores.ndim != 2 or item_scores.shape[1] != n:
        raise ValueError(f"item_scores must be (B, {n}), got {tuple(item_scores.shape)}")
    p = torch.softmax(item_scores.float(), dim=1)  # (B, N)
    flat = (codes_t + torch.arange(m) * codebook_size).reshape(-1)  # (N*m,) item-major
    marg = torch.zeros(p.shape[0], m * codebook_size)
    marg.index_add_(1, flat, p.repeat_interleave(m, dim=1))
    return torch.log(marg.clamp_min(1e-30)).view(-1, m, codebook_size)


def marginal_product_scorer(score_fn, codes: np.ndarray, codebook_size: int):
    """Wrap an item scorer (``histories -> (B, N)``, as for ``evaluation.evaluate_scorer``) so that it
    ranks like RPG: ``score(item) = sum_j log p_j(code_j(item))`` with ``p_j`` the wrapped model's
    per-codebook marginals (:func:`marginal_code_log_probs`). Returns (B, N) float32 CPU scores. A
    reference level, not an upper bound: what the summed-code-log-prob ranking reaches on these codes
    with that model's per-codebook marginals."""
    codes_t = torch.as_tensor(np.asarray(codes), dtype=torch.long)
    onehot = item_code_matrix(codes_t, codebook_size)  # (N, m*K)

    def score(histories):
        logp = marginal_code_log_probs(torch.as_tensor(score_fn(histories)), codes_t, codebook_size)
        return _sparse_rows_times(onehot, logp.reshape(logp.shape[0], -1))  # (B, N)

    return score


def brute_force_scores(model: RPG, inputs: torch.Tensor) -> torch.Tensor:
    """Reference implementation of ``RPG.score`` (loops over codebooks; for tests)."""
    logp = model.code_log_probs(inputs)  # (B, m, K)
    out = torch.zeros(inputs.shape[0], model.n_items)
    for j in range(model.m):
        out += logp[:, j, model.codes[:, j]]
    return out

