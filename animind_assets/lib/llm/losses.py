"""Completion-only loss, the TRL/transformers trainer hooks (new-row learning rate, progress callback), English
perplexity and validation loss."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from animind_assets.lib.common.progress import eta_text, fmt_seconds
from animind_assets.lib.semantic_ids.tokens import sid_tokens_used as sid_tokens_used
from animind_assets.lib.llm.finetune_config import LogFn, noop_log
from animind_assets.lib.llm.new_token_rows import head_logits, head_rows
from animind_assets.lib.llm.training_data import tokenize_rows

# ---------------------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class SidVocab:
    """The semantic-ID vocabulary of a model whose loss normalises ID tokens among themselves
    (``FinetuneConfig.sid_softmax``). ``token_ids`` (S,) int64, sorted: every ID token (``<L1_0>`` ...) of the
    lookup; ``column`` (V,) int64: a vocabulary id's column in ``token_ids``, -1 for any other token."""

    token_ids: torch.Tensor
    column: torch.Tensor

    @classmethod
    def of(cls, token_ids: Sequence[int], vocab_size: int) -> SidVocab:
        """From the ID tokens' vocabulary ids (any order, duplicates allowed) and the embedding's row count.
        Raises ValueError for an id outside ``[0, vocab_size)`` or an empty list."""
        ids = sorted(set(int(t) for t in token_ids))
        if not ids or ids[0] < 0 or ids[-1] >= vocab_size:
            raise ValueError(f"semantic-ID token ids must be non-empty and in [0, {vocab_size}), got {len(ids)} ids "
                             f"in [{ids[0] if ids else None}, {ids[-1] if ids else None}]")
        tid = torch.tensor(ids, dtype=torch.long)
        col = torch.full((vocab_size,), -1, dtype=torch.long)
        col[tid] = torch.arange(len(ids))
        return cls(tid, col)


def completion_loss(model, input_ids, attention_mask, labels, num_items=None, distill=None, distill_weight: float = 0.0,
                    sid_vocab: SidVocab | None = None):
    """Causal-LM loss evaluated only where ``labels != -100`` (the LM head skips prompt tokens).

    ``distill``: a ``lib/llm/distill.DistillBatch`` of teacher soft targets at some of those positions; there the
    target becomes ``(1 - distill_weight) one_hot + distill_weight q`` (``q`` 0 outside the level's ID tokens).
    ``sid_vocab`` (``FinetuneConfig.sid_softmax``): at a position whose target is an ID token the softmax runs over
    the ID tokens only (the LM head's rows of ``sid_vocab.token_ids``: the vocabulary of the trie-constrained
    decoder, which then normalises the same way, ``lib/llm/infer.step_log_probs``); every other position keeps
    the full vocabulary. Without it every position uses the full vocabulary. Returns (loss, n_tokens, n_correct);
    the loss is summed over positions and divided by ``num_items`` (the trainer's count) or the number of
    positions. Raises ValueError when a distilled position's target is not an ID token of ``sid_vocab``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    h = hidden[:, :-1]
    y = labels[:, 1:]
    mask = y != -100
    hs = h[mask]
    target = y[mask]
    n = int(mask.sum())
    head = base.get_output_embeddings()
    denom = num_items if num_items is not None else max(n, 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(hs.device)
    distilled = distill is not None and distill_weight > 0 and len(distill.flat_index)
    if sid_vocab is None:
        groups = [(head_logits(head, hs).float(), target, torch.arange(n, device=hs.device), None)]
    else:
        column = sid_vocab.column.to(hs.device)[target]
        is_sid = column >= 0
        w = head_rows(head, sid_vocab.token_ids.to(hs.device))
        b = head.bias[sid_vocab.token_ids.to(hs.device)] if getattr(head, "bias", None) is not None else None
        groups = [(torch.nn.functional.linear(hs[is_sid], w, b).float(), column[is_sid], is_sid.nonzero().squeeze(1), sid_vocab)]
        if not bool(is_sid.all()):
            groups.append((head_logits(head, hs[~is_sid]).float(), target[~is_sid], (~is_sid).nonzero().squeeze(1), None))
    loss = hs.sum().float() * 0.0  # keeps the graph when a batch has no completion token
    correct = 0
    for logits, tgt, where, vocab in groups:
        if not len(tgt):
            if distilled and vocab is not None:
                raise ValueError("distilled positions must have semantic-ID targets and ID-token soft targets (sid_vocab)")
            continue
        correct += int((logits.argmax(-1) == tgt).sum())
        if not (distilled and (vocab is not None or sid_vocab is None)):
            loss = loss + torch.nn.functional.cross_entropy(logits, tgt, reduction="sum")
            continue
        # one log-softmax for both terms (the rows are (positions, vocabulary): the largest tensor of the step)
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(1, tgt.unsqueeze(1)).squeeze(1)
        idx = distill.flat_index.to(hs.device)
        cols = distill.token_ids.to(hs.device)
        if vocab is not None:  # flattened completion positions -> rows of this group; vocabulary ids -> its columns
            rank = torch.full((n,), -1, dtype=torch.long, device=hs.device)
            rank[where] = torch.arange(len(where), device=hs.device)
            idx, cols = rank[idx], vocab.column.to(hs.device)[cols]
            if bool((idx < 0).any()) or bool((cols < 0).any()):
                raise ValueError("distilled positions must have semantic-ID targets and ID-token soft targets (sid_vocab)")
        soft = -(distill.targets.to(hs.device) * logp[idx.unsqueeze(1), cols.unsqueeze(0)]).sum()  # (K, S) only
        loss = loss + nll.sum() + distill_weight * (soft - nll[idx].sum())
    return loss / denom, n, correct


def make_trainer_class():
    from trl import SFTTrainer

    class SidSFTTrainer(SFTTrainer):
        fast_loss = True
        distiller = None  # lib/llm/distill.SidDistiller (FinetuneConfig.distill_weight > 0)
        distill_weight = 0.0
        sid_vocab = None  # SidVocab (FinetuneConfig.sid_softmax)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self.fast_loss or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            distill = self.distiller.batch_targets(inputs["labels"]) if self.distiller is not None and model.training else None
            # bf16: the fast path calls the backbone directly, past the autocast wrapper accelerate puts on
            # model.forward, so it opens its own autocast (CPU with AMX-BF16, or CUDA)
            device_type = inputs["input_ids"].device.type
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bool(self.args.bf16)):
                loss, n, correct = completion_loss(model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"],
                                                   num_items_in_batch, distill, self.distill_weight, self.sid_vocab)
            mode = "train" if model.training else "eval"
            if n:
                self._metrics[mode]["mean_token_accuracy"].append(correct / n)
            return loss

    return SidSFTTrainer


def new_rows_lr_callback(model, row_ids: Sequence[int], mult: float, log: LogFn = noop_log):
    """TrainerCallback giving the embedding (and untied head) rows ``row_ids`` an effective learning
    rate ``mult`` x the phase's: the rows are snapshotted before each optimizer step and their update
    is scaled after it (``w = w0 + mult * (w1 - w0)``; exact for any optimizer, unlike a gradient
    scale, which Adam normalises away). The matrices are looked up at every step (``new_token_rows.row_matrices``:
    while ``NewTokenRowsOnly`` is active the new rows live in its parameter). Returns None when the rows cannot be
    reached (logged)."""
    from transformers import TrainerCallback

    from animind_assets.lib.llm.new_token_rows import row_matrices

    try:
        device = model.get_input_embeddings().weight.device
        model.get_output_embeddings()
    except AttributeError as exc:
        log(f"new-row learning-rate multiplier skipped: embeddings not reachable ({exc})")
        return None
    idx = torch.as_tensor(list(row_ids), dtype=torch.long, device=device)

    class _CB(TrainerCallback):
        before: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def on_step_begin(self, args, state, control, **kw):
            self.before = [(m, i, m.detach()[i].clone()) for m, i in row_matrices(model, idx)]

        def on_step_end(self, args, state, control, **kw):
            with torch.no_grad():
                for m, i, b in self.before:
                    m[i] = b + mult * (m[i] - b)

    return _CB()


def time_decay_lr_callback(deadline: float, decay_seconds: float, log: LogFn = noop_log):
    """TrainerCallback for a warmup-stable-decay schedule over wall-clock time (WSD: Hu et al. 2024, "MiniCPM";
    Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"): before each
    optimizer step, every parameter group's learning rate becomes the scheduler's value x
    ``clip((deadline - now) / decay_seconds, 0, 1)``, so it falls linearly to 0 over the last ``decay_seconds``
    seconds before ``deadline`` (a ``time.perf_counter()`` value). Meant for a step count the budget, not
    ``max_steps``, decides (``FinetuneConfig.lr_decay_frac``). Not cumulative: the factor multiplies the
    scheduler's ``get_last_lr()``, which a ``LambdaLR`` schedule (every HF schedule but ``reduce_lr_on_plateau``)
    rebuilds each step. The Trainer's logged ``learning_rate`` is multiplied by the factor too and
    ``lr_decay_factor`` is added to the logs (list this callback before the one that forwards logs).
    ``.factor``: the last factor applied (1.0 before the first step). ValueError when ``decay_seconds`` <= 0."""
    from transformers import TrainerCallback

    if decay_seconds <= 0:
        raise ValueError(f"decay_seconds must be > 0, got {decay_seconds}")

    class _CB(TrainerCallback):
        factor = 1.0

        def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            if optimizer is None or lr_scheduler is None:
                return
            f = min(1.0, max(0.0, (deadline - time.perf_counter()) / decay_seconds))
            if f < 1.0 <= self.factor:
                log(f"learning rate at x{f:.2f} of the schedule from step {state.global_step} of this phase, falling "
                    f"linearly to 0 at the end of the budget (decay window {fmt_seconds(decay_seconds)})")
            for g, lr in zip(optimizer.param_groups, lr_scheduler.get_last_lr()):
                g["lr"] = lr * f
            self.factor = f

        def on_log(self, args, state, control, logs=None, **kw):
            if logs is not None and "learning_rate" in logs:
                logs["learning_rate"] = float(logs["learning_rate"]) * self.factor
                logs["lr_decay_factor"] = self.factor

    return _CB()


def make_progress_callback(phase: str, step_offset: int, log: LogFn, run, history: list, t0: float, max_steps: int,
                           deadline: float | None = None):
    """TrainerCallback forwarding logs to ``log`` and an MLflow run (metrics prefixed by phase).

    Each log line gives the step, loss, token accuracy, steps/s, elapsed time and an ETA: the time the remaining
    steps take at the rate so far or, with ``deadline`` (a ``time.perf_counter()`` value: the wall-clock budget
    ``max_train_seconds``), the time left in the budget when that ends training first (marked "budget")."""
    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            step = step_offset + state.global_step
            history.append({"phase": phase, "step": step, **logs})
            el = time.perf_counter() - t0
            done = max(state.global_step, 1)
            left = None if deadline is None else deadline - time.perf_counter()
            if "loss" in logs:  # the end-of-training summary (train_loss, runtime) is reported by the caller
                log(
                    f"{phase}: step {state.global_step}/{max_steps} loss {logs['loss']:.4f} "
                    f"acc {logs.get('mean_token_accuracy', float('nan')):.3f} ({done / max(el, 1e-9):.3f} steps/s, "
                    f"elapsed {fmt_seconds(el)}, ETA {eta_text(done, max(max_steps, done), el, left)})"
                )
            if run is not None:
                run.log_metrics({f"{phase}/{k}": v for k, v in logs.items()}, step=step)

    return _CB()


# ---------------------------------------------------------------------------------------- perplexity
@torch.no_grad()
def english_perplexity(model, tokenizer, texts: Sequence[str] | None = None, max_tokens: int = 256) -> float:
    from animind_assets.lib.llm.english_heldout import PARAGRAPHS

    texts = list(texts or PARAGRAPHS)
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True, return_tensors="pt")["input_ids"][:, :max_tokens]
        if ids.shape[1] < 2:
            continue
        out = model(input_ids=ids.to(model.device), labels=ids.to(model.device))
        k = ids.shape[1] - 1
        nll += float(out.loss) * k
        n += k
    if was_training:
        model.train()
    return float(math.exp(nll / max(n, 1)))


@torch.no_grad()
def validation_loss(model, tokenizer, rows: list[dict], max_len: int, use_chat_template: bool, batch_size: int = 8,
                    sid_vocab: SidVocab | None = None) -> float | None:
    """Mean completion loss (nats per answer token, hard labels) of ``rows``; ``sid_vocab`` as in ``completion_loss``
    (a model trained with ``FinetuneConfig.sid_softmax`` is validated the way it was trained). None without rows."""
    enc, _ = tokenize_rows(tokenizer, rows, max_len, use_chat_template)
    if not enc["input_ids"]:
        return None
    was_training = model.training
    model.eval()
    tot, ntok = 0.0, 0
    pad = tokenizer.pad_token_id
    for s in range(0, len(enc["input_ids"]), batch_size):
        xs, ms = enc["input_ids"][s : s + batch_size], enc["completion_mask"][s : s + batch_size]
        L = max(len(x) for x in xs)
        ids = torch.full((len(xs), L), pad, dtype=torch.long)
        att = torch.zeros((len(xs), L), dtype=torch.long)
        lab = torch.full((len(xs), L), -100, dtype=torch.long)
        for i, (x, m) in enumerate(zip(xs, ms)):
            ids[i, : len(x)] = torch.tensor(x)
            att[i, : len(x)] = 1
            lab[i, : len(x)] = torch.tensor([t if mm else -100 for t, mm in zip(x, m)])
        loss, n, _ = completion_loss(model, ids.to(model.device), att.to(model.device), lab.to(model.device), None,
                                     sid_vocab=sid_vocab)
        tot += float(loss) * n
        ntok += n
    if was_training:
        model.train()
    return tot / max(ntok, 1)
