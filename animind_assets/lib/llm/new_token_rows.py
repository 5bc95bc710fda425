"""Only the new-token rows of a tied embedding / LM head as trainable parameters (``FinetuneConfig.train_base_token_rows``
false), without the dense gradient and optimizer state of the whole vocabulary.

With the base vocabulary frozen, the earlier implementation (``finetune.freeze_base_rows``) kept the whole tied
(V, d) matrix trainable and zeroed its first ``n_base`` gradient rows: every step still built a dense (V, d) gradient
in the LM head's backward pass, clipped it and ran AdamW over all V rows (V ≈ 50,000 for SmolLM2, d = 576: 28.7M
parameters, most of a step's optimizer time). :class:`NewTokenRowsOnly` makes the N = V - n_base new rows their own
(N, d) parameter for the length of a training phase; the head's logits are the concatenation of the frozen base
rows' and the new rows' products (:func:`head_logits`), so the base rows get no gradient at all. With weight decay 0
the updates are the same as the masked-gradient form (Adam's update of a row with zero gradient and zero state is 0);
with weight decay > 0 the base rows are not decayed either (the masked form decayed them).
"""

from __future__ import annotations

import torch

from animind_assets.lib.llm.finetune_config import LogFn, noop_log

ROWS_ATTR = "animind_new_token_rows"  # the (N, d) parameter registered on the input embedding while a phase trains
SPLIT_ATTR = "_animind_new_token_rows_split"  # the NewTokenRowsOnly object, on the embedding and the LM head


def split_of(model_or_module) -> NewTokenRowsOnly | None:
    """The active :class:`NewTokenRowsOnly` of a model (or of its LM head / input embedding module), else None."""
    mod = model_or_module
    if hasattr(mod, "get_output_embeddings"):
        mod = mod.get_output_embeddings()
    return getattr(mod, SPLIT_ATTR, None) if mod is not None else None


def why_not_applicable(model, detached_input: bool) -> str | None:
    """None when :class:`NewTokenRowsOnly` can be used on ``model``, else the reason (str). Requires an LM head
    tied to the input embedding, without bias, and an input embedding whose output is detached
    (``detached_input``: the top-``train_layers`` fine-tune, where no gradient reaches the input rows)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None or head is None:
        return "the model exposes no input embedding / LM head"
    if head.weight.data_ptr() != emb.weight.data_ptr():
        return "the LM head is not tied to the input embedding"
    if getattr(head, "bias", None) is not None:
        return "the LM head has a bias"
    if not detached_input:
        return "gradients flow into the input embedding (every block trains)"
    return None


class NewTokenRowsOnly:
    """Context manager: while a phase trains, rows ``n_base..V-1`` of the tied (V, d) embedding / LM head weight are a
    separate (N, d) parameter ``ROWS_ATTR`` of the input embedding module (so the Trainer's optimizer, gradient
    clipping and checkpoints see it), and the tied weight has ``requires_grad`` False.

    * The LM head's logits come from :func:`head_logits` / :func:`head_rows` (``losses.completion_loss`` uses them):
      (B, n_base) products with the frozen rows, (B, N) with the parameter, concatenated; no gradient is formed for
      the base rows. ``base_dtype`` (e.g. ``torch.bfloat16`` under bf16 autocast) keeps a cast copy of the frozen rows
      for those products, cast once per phase instead of by autocast at every step.
    * The input embedding keeps reading the tied weight; :meth:`sync` copies the parameter into its rows. It runs
      after every optimizer step (:meth:`callback`, listed after any callback
      that rescales the rows' update) and on exit, so the weight the Trainer checkpoints and the caller saves is
      current. Only valid when the embedding's output is detached (see :func:`why_not_applicable`).

    On exit the parameter is removed, the final rows are in the weight and its ``requires_grad`` is restored.
    Raises ValueError when ``n_base`` is not in [1, V)."""

    def __init__(self, model, n_base: int, base_dtype: torch.dtype | None = None, log: LogFn = noop_log):
        self.emb = model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        self.weight = self.emb.weight
        v = self.weight.shape[0]
        if not 0 < n_base < v:
            raise ValueError(f"n_base must be in [1, {v}) (rows of the embedding), got {n_base}")
        self.n_base = int(n_base)
        self.base_dtype = base_dtype
        self.log = log
        self.rows: torch.nn.Parameter | None = None
        self.base: torch.Tensor | None = None
        self._requires_grad = bool(self.weight.requires_grad)

    @property
    def n_new(self) -> int:
        return int(self.weight.shape[0] - self.n_base)

    def __enter__(self):
        w = self.weight.detach()
        self.rows = torch.nn.Parameter(w[self.n_base :].clone())
        base = w[: self.n_base]
        self.base = base.to(self.base_dtype) if self.base_dtype is not None and self.base_dtype != base.dtype else base
        self.weight.requires_grad_(False)
        self.emb.register_parameter(ROWS_ATTR, self.rows)
        for m in {id(self.emb): self.emb, id(self.head): self.head}.values():
            setattr(m, SPLIT_ATTR, self)
        self.log(f"base vocabulary rows 0..{self.n_base - 1} frozen outside the optimizer; the {self.n_new} new token "
                 f"rows are the trainable parameter {ROWS_ATTR}")
        return self

    def sync(self) -> None:
        """Copy the trainable rows into the tied weight (no autograd)."""
        if self.rows is not None:
            with torch.no_grad():
                self.weight[self.n_base :].copy_(self.rows)

    def __exit__(self, *exc):
        self.sync()
        if ROWS_ATTR in self.emb._parameters:
            del self.emb._parameters[ROWS_ATTR]
        for m in (self.emb, self.head):
            if getattr(m, SPLIT_ATTR, None) is self:
                delattr(m, SPLIT_ATTR)
        self.weight.requires_grad_(self._requires_grad)
        self.rows, self.base = None, None
        return False

    def callback(self):
        """A ``TrainerCallback`` whose ``on_step_end`` calls :meth:`sync` (list it last)."""
        from transformers import TrainerCallback

        split = self

        class _Sync(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                split.sync()

        return _Sync()


def head_logits(head, hs: torch.Tensor) -> torch.Tensor:
    """LM-head logits (M, V) of hidden states ``hs`` (M, d); with an active :class:`NewTokenRowsOnly` the new rows'
    columns carry the gradient of its parameter and the base rows' none, otherwise ``head(hs)``."""
    split = getattr(head, SPLIT_ATTR, None)
    if split is None or split.rows is None:
        return head(hs)
    return torch.cat([torch.nn.functional.linear(hs, split.base), torch.nn.functional.linear(hs, split.rows)], dim=-1)


def head_rows(head, token_ids: torch.Tensor) -> torch.Tensor:
    """Rows (S, d) of the LM head's weight for vocabulary ids ``token_ids`` (S,) int64; with an active
    :class:`NewTokenRowsOnly` new-token rows come from (and differentiate into) its parameter."""
    split = getattr(head, SPLIT_ATTR, None)
    if split is None or split.rows is None:
        return head.weight[token_ids]
    new = token_ids >= split.n_base
    if bool(new.all()):
        return split.rows[token_ids - split.n_base]
    base = split.base[token_ids.clamp(max=split.n_base - 1)].to(split.rows.dtype)
    return torch.where(new.unsqueeze(1), split.rows[(token_ids - split.n_base).clamp(min=0)], base)


def row_matrices(model, row_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(matrix, row indices) pairs that hold the trainable values of vocabulary rows ``row_ids`` (R,) int64: the
    input embedding's weight and an untied head's, or, with an active :class:`NewTokenRowsOnly`, its parameter (ids
    shifted by ``n_base``; base ids dropped, they do not train). Raises AttributeError when the model has no
    input embedding."""
    emb = model.get_input_embeddings()
    split = getattr(emb, SPLIT_ATTR, None)
    if split is not None and split.rows is not None:
        new = row_ids[row_ids >= split.n_base] - split.n_base
        return [(split.rows, new)] if len(new) else []
    mats = [(emb.weight, row_ids)]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
        mats.append((head.weight, row_ids))
    return mats
