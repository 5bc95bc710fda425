"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018), ID-based.

Item tokens (``item_id + 1``, 0 = padding) are embedded (``* sqrt(d)``), learned absolute positions are
added (the last position of every sequence is always position ``max_len - 1``, as in the original
left-padded implementation), dropout, ``blocks`` pre-LayerNorm causal self-attention blocks, final
LayerNorm. The hidden state at position t is scored against the (shared) item embedding table.

Losses (``SASRecConfig.loss``):

* ``"ce"`` (default): full softmax cross-entropy over all items at every position. This is the variant
  public reproductions use to reach Recall@10 0.074-0.093 on Beauty (e.g. RecBole's SASRec;
  Klenitskiy & Vasilev, RecSys 2023, "Turning Dross Into Gold Loss: is BERT4Rec really better than
  SASRec?").
* ``"bce"``: the original paper's binary cross-entropy with one uniformly sampled negative per position
  (the "SASRec 0.0605" row copied into many papers).

Scoring is exact: ``h_last @ E.T`` for every item (``score`` returns (B, n_items) float32).
Public API: ``SASRecConfig``, ``SASRec``, ``train_sasrec(split, cfg, log=None) -> SeqTrainResult``,
``save_sasrec`` / ``load_sasrec``.
"""

from __future__ import annotations

import math
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

LOSSES = ("ce", "bce")


@dataclass
class SASRecConfig(ModelConfigMixin):
    """Model knobs (the training knobs are in ``train``: ``SeqTrainConfig``)."""

    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.5
    loss: str = "ce"  # "ce" (full softmax) | "bce" (1 sampled negative per position)
    train: SeqTrainConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = SeqTrainConfig()
        elif isinstance(self.train, dict):
            self.train = SeqTrainConfig.from_dict(self.train)

    def validate(self) -> SASRecConfig:
        if self.loss not in LOSSES:
            raise ValueError(f"SASRecConfig.loss={self.loss!r}; expected one of {LOSSES}")
        if self.hidden < 1 or self.blocks < 1 or self.heads < 1:
            raise ValueError("SASRecConfig.hidden, blocks and heads must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout}")
        self.train.validate()
        return self



class SASRec(torch.nn.Module):
    """SASRec over ``n_items`` items (ids ``0..n_items-1``); see the module docstring."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        cfg.validate()
        self.n_items = int(n_items)
        self.cfg = cfg
        d = cfg.hidden
        self.max_len = cfg.train.max_len
        self.item_emb = torch.nn.Embedding(self.n_items + 1, d, padding_idx=0)
        self.pos_emb = torch.nn.Embedding(self.max_len, d)
        self.emb_drop = torch.nn.Dropout(cfg.dropout)
        self.blocks = torch.nn.ModuleList(
            CausalBlock(d, cfg.heads, d, cfg.dropout, cfg.dropout, activation="relu") for _ in range(cfg.blocks)
        )
        self.final_ln = torch.nn.LayerNorm(d, eps=1e-8)
        for name, p in self.named_parameters():
            if p.dim() > 1 and "ln" not in name:
                torch.nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 tokens (left-padded) -> (B, L, d) hidden states (0 at padding)."""
        b, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"sequence length {length} > max_len {self.max_len}")
        pad = (tokens > 0).unsqueeze(-1).float()
        x = self.item_emb(tokens) * math.sqrt(self.cfg.hidden)
        pos = torch.arange(self.max_len - length, self.max_len, device=tokens.device)
        x = self.emb_drop(x + self.pos_emb(pos).unsqueeze(0)) * pad
        mask = padded_causal_mask(tokens, self.cfg.heads)
        for blk in self.blocks:
            x = blk(x, mask) * pad
        return self.final_ln(x) * pad

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over positions with a target (``targets > 0``)."""
        h = self.hidden_states(inputs)
        valid = targets > 0
        hv = h[valid]  # (M, d)
        tv = targets[valid]  # (M,) tokens
        if self.cfg.loss == "ce":
            logits = hv @ self.item_emb.weight[1:].T
            return F.cross_entropy(logits, tv - 1)
        neg = torch.randint(1, self.n_items + 1, tv.shape, device=tv.device)
        neg = torch.where(neg == tv, neg % self.n_items + 1, neg)
        pos_logit = (hv * self.item_emb(tv)).sum(-1)
        neg_logit = (hv * self.item_emb(neg)).sum(-1)
        return F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit)) + F.binary_cross_entropy_with_logits(
            neg_logit, torch.zeros_like(neg_logit)
        )

    @torch.no_grad()
    def position_logits(self, inputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens and a (B, L) bool mask -> (M, n_items) float32 next-item logits at the M masked
        positions (row order of ``h[valid]``), without gradients: a teacher for distillation
        (``rpg.RPG.set_teacher``). Call in eval mode for dropout-free logits. Raises ``ValueError`` when
        ``L > max_len``."""
        return (self.hidden_states(inputs)[valid] @ self.item_emb.weight[1:].T).float()

    @torch.no_grad()
    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, n_items) float32 scores for the next item (exact, every item)."""
        h = self.hidden_states(inputs)[:, -1]
        return (h @ self.item_emb.weight[1:].T).float()


def train_sasrec(split: SequenceSplit, cfg: SASRecConfig, log: LogFn | None = None, on_eval=None,
                 init: SASRec | None = None) -> SeqTrainResult:
    """Build and train a SASRec on ``split`` (see ``seqtrain.train_sequence_model``). ``init``: start
    from these weights (same architecture; e.g. a model saved by an earlier, budget-limited run; the
    optimizer state starts fresh)."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    model = SASRec(split.n_items, cfg)
    if init is not None:
        model.load_state_dict(init.state_dict())
    return train_sequence_model(model, split, cfg.train, name=f"sasrec-{cfg.loss}", log=log, on_eval=on_eval)


def save_sasrec(model: SASRec, dest: str, extra: dict[str, Any] | None = None) -> str:
    """Folder with ``weights.pt`` (state dict) + ``config.json`` (+ ``extra.json``), written atomically."""
    return write_model_folder(model.state_dict(), {"n_items": model.n_items, **model.cfg.to_dict()}, dest, extra)


def sasrec_item_vectors(model: SASRec) -> np.ndarray:
    """The learned item embeddings of a SASRec model, ``(n_items, hidden)`` float32, row ``i`` = item id ``i``
    (the padding row 0 of the embedding table is dropped). Used as the input of product quantization for RPG."""
    return model.item_emb.weight[1:].detach().cpu().float().numpy().copy()


def load_sasrec(src: str, map_location: str = "cpu") -> tuple[SASRec, dict[str, Any]]:
    """-> (model in eval mode, extra). ``torch.load(weights_only=True)``."""
    state, conf, extra = read_model_folder(src, map_location)
    model = SASRec(int(conf.pop("n_items")), SASRecConfig.from_dict(conf))
    model.load_state_dict(state)
    model.eval()
    return model, extra
