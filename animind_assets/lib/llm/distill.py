"""Knowledge distillation of a next-item teacher into the semantic-ID LM (code-level soft targets).

A trained item-level recommender (e.g. the Beauty ``SASRec``, ``lib/retrieval/sasrec.py``) scores every
item after every prefix of a sequence. Its softmax is a dense target: one training position then says how
likely *each* item is, not only which one came next (Hinton et al., "Distilling the Knowledge in a Neural
Network", 2015; for LLM recommenders e.g. DLLM2Rec, Cui et al. RecSys 2024). The LM predicts an item as
its semantic ID, one level token at a time, so the teacher's item distribution ``p`` is turned into one
distribution per level, conditioned on the true prefix of the target's ID, exactly the factorisation the
LM's chain rule uses:

    q_l(c) = sum_{i : code_<l(i) = code_<l(target), code_l(i) = c} p(i)  /  sum_{i : code_<l(i) = code_<l(target)} p(i)

so ``prod_l q_l(code_l(i))`` = ``p(i)`` renormalised over the items that have an ID (exact, not an
approximation; items without an ID in the lookup, or that the teacher gives ``-inf``, get no mass). A level
where the teacher gives every item of the true prefix ``-inf`` keeps the plain one-hot target.

Where it applies: every ID of a completion (the answer turn) that follows another ID of the same completion
directly (a run of adjacent IDs; any other token ends the run). With this project's datasets only task B in
the **"sequence" form** (``next_id_format = "sequence"``; the ID sequence is the answer) writes such runs, so
in practice it is that form; ``run_finetune`` refuses distillation on a dataset without such rows. The first
item of a completion and the single-item answers of the question form keep the plain one-hot loss.
The weights are computed in log space (no underflow at small temperatures). At a distilled token the target becomes ``(1 - a) one_hot + a q_l`` with
``a = FinetuneConfig.distill_weight`` (cross-entropy against it, over the whole vocabulary: ``q_l`` is 0
outside the level's ID tokens); ``distill_temperature`` divides the teacher's logits.

This module never imports Dagster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from animind_assets.lib.common.fingerprint import array_fingerprint, json_fingerprint
from animind_assets.lib.retrieval.seqtrain import pad_left
from animind_assets.lib.semantic_ids.tokens import level_tokens, sid_codes

# teacher(seqs) -> (M, n_items) float logits: for each sequence s (item ids, oldest first) the rows for the
# next item after s[:1], s[:2], ..., s[:-1] (len(s) - 1 rows), sequences concatenated in order
Teacher = Callable[[list[list[int]]], torch.Tensor]


def position_logits_teacher(model, pad_offset: int = 1) -> Teacher:
    """A :data:`Teacher` from a model with ``position_logits(inputs (B, L) int64, valid (B, L) bool) -> (M, N)``
    and ``max_len`` (``SASRec``; ``lib/retrieval/sasrec.py``): item id ``i`` is token ``i + pad_offset``,
    sequences are left-padded with 0 and cut to their last ``max_len`` items (the rows of the cut-off
    prefixes then see at most ``max_len`` items, as the teacher was trained). The model is put in eval mode
    and never trained."""
    model.eval()
    max_len = int(getattr(model, "max_len", 10**9))

    def teacher(seqs: list[list[int]]) -> torch.Tensor:
        device = next(model.parameters()).device
        prefixes, windowed = [], []
        for s in seqs:  # the target of position t is s[t + 1]
            if len(s) - 1 <= max_len:  # one pass: every position is a target row
                prefixes.append(s[:-1])
                windowed.append(False)
            else:  # rare (completions are short): one window per target, each of the last max_len items
                prefixes += [s[max(0, t - max_len):t] for t in range(1, len(s))]
                windowed += [True] * (len(s) - 1)
        inputs = pad_left(prefixes, max_len, pad_offset)
        valid = inputs > 0
        win = torch.as_tensor(windowed, dtype=torch.bool)
        valid[win] = False
        valid[win, -1] = True  # a window: only its last position is a target row
        with torch.no_grad():
            return model.position_logits(inputs.to(device), valid.to(device)).float()

    return teacher


def ensemble_teacher(teachers: Sequence[Teacher]) -> Teacher:
    """A :data:`Teacher` that is the **mean of the next-item probabilities** of ``teachers`` (an ensemble of K
    teachers scoring the same items, e.g. SASRecs trained with different seeds): it returns
    ``log(1/K sum_k softmax(logits_k))`` (M, n_items) float32, log-probabilities, which the distiller and
    :func:`fit_temperature` treat as logits. The arithmetic mean of the members' predictive distributions as the
    soft target is the ensemble case of Hinton et al. 2015, "Distilling the Knowledge in a Neural Network",
    section 1 (also You et al., "Learning from Multiple Teacher Networks", KDD 2017); the mean of probabilities,
    unlike the mean of logits, keeps an item that any member finds likely. A temperature T is applied to the
    mixture (``softmax(log p / T)``), which equals Hinton's mean of the members' softened outputs only at T = 1 (the
    recipe's T). An item every member gives ``-inf`` stays ``-inf``; a member whose whole row is ``-inf`` (it
    scores nothing at that position) is left out of that row's mean, and a row no member scores stays all ``-inf``
    (the distiller skips non-finite rows). One teacher is returned as it is (its own logits and dtype, not
    log-softmaxed: the same softmax). The members' outputs must be on one device. Raises ``ValueError`` without
    teachers, or (when called) when the members' outputs differ in shape."""
    teachers = list(teachers)
    if not teachers:
        raise ValueError("ensemble_teacher needs at least one teacher")
    if len(teachers) == 1:
        return teachers[0]

    def teacher(seqs: list[list[int]]) -> torch.Tensor:
        outs = [t(seqs).float() for t in teachers]
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) != 1:
            raise ValueError(f"ensemble_teacher: the members score different shapes {sorted(shapes)} (same items and "
                             "positions needed)")
        logp = torch.stack([torch.log_softmax(o, dim=1) for o in outs])  # (K, M, n_items); an all -inf row: NaN
        scored = torch.isfinite(torch.stack([o.amax(dim=1) for o in outs]))  # (K, M): the member scores that row
        logp = torch.where(scored[:, :, None], logp, logp.new_tensor(float("-inf")))
        n_members = scored.sum(dim=0).clamp(min=1).to(logp.dtype)  # (M,) members in each row's mean
        return torch.logsumexp(logp, dim=0) - torch.log(n_members)[:, None]

    return teacher


def model_teacher(models: Sequence, **params) -> tuple[Teacher, str]:
    """The distillation teacher of one or several loaded next-item models (``SASRec``s scoring the same catalog)
    and its fingerprint for ``run_finetune(teacher_fingerprint=...)``: one model gives its
    :func:`position_logits_teacher` and ``teacher_fingerprint(weights, **params)``; several give
    :func:`ensemble_teacher` of theirs (the mean of their next-item probabilities) and a fingerprint of every
    member's weights that does not depend on their order (the mean does not) plus ``params`` (JSON-able, e.g. the
    training data's fingerprint). Raises ``ValueError`` without models."""
    models = list(models)
    if not models:
        raise ValueError("model_teacher needs at least one model")
    teacher = ensemble_teacher([position_logits_teacher(m) for m in models])
    if len(models) == 1:
        return teacher, teacher_fingerprint(*models[0].state_dict().values(), **params)
    each = sorted(teacher_fingerprint(*m.state_dict().values()) for m in models)
    return teacher, teacher_fingerprint(ensemble="mean_probability", members=each, **params)


@dataclass
class DistillBatch:
    """Soft targets of one training batch. ``flat_index`` (K,) int64: positions in the flattened
    completion positions of ``completion_loss`` (row-major over ``labels[:, 1:] != -100``);
    ``targets`` (K, S) float32: the level distributions ``q_l`` over the S ID tokens ``token_ids``."""

    flat_index: torch.Tensor
    targets: torch.Tensor
    token_ids: torch.Tensor


class SidDistiller:
    """Turns a batch's completions into teacher soft targets at their ID tokens (module docstring).

    ``item_ids`` / ``semantic_ids``: the catalog (item id in the teacher's column space ``0..n_items-1``,
    ID string ``<L1_a><L2_b>...``); ``token_id``: maps a level token to its id in the extended tokenizer
    (``tokenizer.convert_tokens_to_ids``); ``teacher``: a :data:`Teacher`; ``temperature`` > 0.
    Raises ``ValueError`` when an item id is outside ``0..n_items-1`` or two items share an ID."""

    def __init__(self, item_ids: Sequence[int], semantic_ids: Sequence[str], token_id: Callable[[str], int],
                 teacher: Teacher, n_items: int, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"distill temperature must be > 0, got {temperature}")
        codes = [sid_codes(s) for s in semantic_ids]
        n_lev = max((len(c) for c in codes), default=0)
        self.item_of: dict[tuple[int, ...], int] = {}
        for item, c in zip(item_ids, codes):
            item = int(item)
            if not 0 <= item < n_items:
                raise ValueError(f"item id {item} outside the teacher's 0..{n_items - 1}")
            ids = tuple(int(token_id(t)) for t in level_tokens(c))
            if ids in self.item_of:
                raise ValueError(f"items {self.item_of[ids]} and {item} share the semantic ID {''.join(level_tokens(c))}")
            self.item_of[ids] = item
        self.level_of = {t: lv for ids in self.item_of for lv, t in enumerate(ids)}
        self.token_ids = torch.as_tensor(sorted(self.level_of), dtype=torch.long)
        compact = {t: j for j, t in enumerate(self.token_ids.tolist())}
        # only the items with an ID can take mass: the level targets work on those columns of the teacher's logits
        ids_of = sorted((item, ids) for ids, item in self.item_of.items())
        self.with_id = torch.as_tensor([item for item, _ in ids_of], dtype=torch.long)
        self.row_of = {item: r for r, (item, _) in enumerate(ids_of)}
        sub_tok = np.full((len(ids_of), n_lev), -1, dtype=np.int64)  # token ids, -1 = no such level
        sub_compact = np.full((len(ids_of), n_lev), -1, dtype=np.int64)  # their columns among token_ids
        for r, (_, ids) in enumerate(ids_of):
            sub_tok[r, : len(ids)] = ids
            sub_compact[r, : len(ids)] = [compact[t] for t in ids]
        self.sub_tok = torch.as_tensor(sub_tok)  # (N_id, n_lev)
        self.sub_compact = torch.as_tensor(sub_compact)
        self.teacher = teacher
        self.n_items = int(n_items)
        self.temperature = float(temperature)
        self.positions_seen = 0
        self.positions_distilled = 0

    def _items_of_row(self, label_row: list[int]) -> list[tuple[int, list[int]]]:
        """(item id, [positions of its level tokens]) for each complete ID in one row's completion tokens
        (``label_row``: the labels, -100 outside the completion), in order; a run broken by a non-ID token or
        an unknown ID ends the sequence (later items start a new one only after it)."""
        out: list[tuple[int, list[int]]] = []
        cur: list[int] = []
        pos: list[int] = []

        def close():
            item = self.item_of.get(tuple(cur))
            if item is not None:
                out.append((item, list(pos)))
            else:
                out.append((-1, []))

        for j, t in enumerate(label_row):
            lv = self.level_of.get(t)
            if lv is None:
                if cur:
                    close()
                    cur, pos = [], []
                if t != -100:
                    out.append((-1, []))  # a non-ID completion token: the history is broken here
                continue
            if lv == 0 and cur:
                close()
                cur, pos = [], []
            cur.append(t)
            pos.append(j)
        if cur:
            close()
        return out

    def batch_targets(self, labels: torch.Tensor) -> DistillBatch | None:
        """``labels`` (B, T) int64 (-100 outside completions) -> the soft targets of the batch, or None when no
        completion of it holds an item after another item."""
        lab = labels.detach().cpu()
        mask = lab[:, 1:] != -100
        flat_of = torch.full(mask.shape, -1, dtype=torch.long)
        flat_of[mask] = torch.arange(int(mask.sum()))
        seqs: list[list[int]] = []
        targets: list[tuple[int, list[int]]] = []  # (target item, label positions)
        for b in range(lab.shape[0]):
            runs: list[list[tuple[int, list[int]]]] = [[]]
            flat_row = flat_of[b].tolist()
            for item, pos in self._items_of_row(lab[b].tolist()):
                if item < 0:
                    runs.append([])
                else:
                    runs[-1].append((item, pos))
            for run in runs:
                if len(run) >= 2:
                    seqs.append([it for it, _ in run])
                    targets += [(it, [flat_row[p - 1] for p in pos]) for it, pos in run[1:]]
            self.positions_seen += sum(len(r) for r in runs)
        if not seqs:
            return None
        logits = self.teacher(seqs)
        if logits.shape != (len(targets), self.n_items):
            raise ValueError(f"teacher returned {tuple(logits.shape)} logits, expected ({len(targets)}, {self.n_items})")
        z = logits.float().cpu()[:, self.with_id] / self.temperature  # (M, N_id) log-weights; -inf = impossible item
        true = self.sub_tok[torch.as_tensor([self.row_of[t] for t, _ in targets], dtype=torch.long)]  # (M, n_lev)
        n_s = len(self.token_ids)
        flat_idx: list[torch.Tensor] = []
        soft: list[torch.Tensor] = []
        match = torch.ones_like(z, dtype=torch.bool)
        distilled = torch.zeros(len(targets), dtype=torch.bool)
        for lv in range(self.sub_tok.shape[1]):
            if lv > 0:
                match &= self.sub_tok[:, lv - 1].unsqueeze(0) == true[:, lv - 1].unsqueeze(1)
            cols = self.sub_compact[:, lv]
            ok = cols >= 0
            # in log space, shifted by each row's largest matching logit: no underflow at small temperatures
            zl = z.masked_fill(~match, float("-inf"))[:, ok]
            top = zl.amax(1, keepdim=True)
            finite = torch.isfinite(top.squeeze(1))
            w = torch.exp(zl - top.masked_fill(~torch.isfinite(top), 0.0))  # rows without a finite logit: all 0
            q = torch.zeros((z.shape[0], n_s), dtype=torch.float32).index_add_(1, cols[ok], w)
            q = q / q.sum(1, keepdim=True).clamp_min(1e-30)
            # a level gets a soft target only where the teacher gives some item of the true prefix a finite logit;
            # elsewhere the position keeps the plain one-hot loss
            rows = [m for m, (_, fl) in enumerate(targets) if lv < len(fl) and true[m, lv] >= 0 and bool(finite[m])]
            if rows:
                flat_idx.append(torch.as_tensor([targets[m][1][lv] for m in rows], dtype=torch.long))
                soft.append(q[rows])
                distilled[rows] = True
        self.positions_distilled += int(distilled.sum())
        if not flat_idx:
            return None
        return DistillBatch(torch.cat(flat_idx), torch.cat(soft), self.token_ids)


def ease_teacher(ease, n_items: int) -> Teacher:
    """A :data:`Teacher` from a fitted ``EASE`` (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data",
    WWW 2019; ``lib/retrieval/item_baselines.py``) for **set completion** (lists without time order, as MAL
    2020): the logits of the item after ``s[:t]`` are the EASE scores of the set ``s[:t]`` (``sum_j B[j]``),
    items of ``s[:t]`` get ``-inf`` (a list names an item once), and so do items EASE never saw (no training list
    holds them, so they are no training target either; a finite score would give the thousands of catalog ids
    without a list a share of the softmax and bias the fitted temperature). ``n_items``: the logit width (item ids ``0..n_items-1``; ids of ``ease.items`` must be below it).
    EASE scores are not log-probabilities: pair it with a fitted temperature (:func:`fit_temperature`)."""
    items = np.asarray(ease.items, dtype=np.int64)
    if items.size and int(items.max()) >= n_items:
        raise ValueError(f"EASE knows item {int(items.max())}, beyond the teacher width {n_items}")
    B = torch.as_tensor(np.asarray(ease.B, dtype=np.float32))
    index = {int(a): i for i, a in enumerate(items.tolist())}
    cols = torch.as_tensor(items)

    def teacher(seqs: list[list[int]]) -> torch.Tensor:
        out = []
        for s in seqs:
            n = len(s) - 1
            idx = torch.as_tensor([index.get(int(a), -1) for a in s[:-1]], dtype=torch.long)
            contrib = torch.zeros((n, B.shape[0]))
            known = idx >= 0
            contrib[known] = B[idx[known]]
            full = torch.full((n, n_items), float("-inf"))
            full[:, cols] = contrib.cumsum(0)  # row t: the scores of the set s[:t + 1]
            tri = torch.tril_indices(n, n)  # (row t, j <= t): item s[j] is in row t's prefix
            full[tri[0], torch.as_tensor(s[:-1], dtype=torch.long)[tri[1]]] = float("-inf")
            out.append(full)
        return torch.cat(out) if out else torch.zeros((0, n_items))

    return teacher


# the grid of the held-out fit (FinetuneConfig.distill_temperature_fit "validation"): 1e-3 .. 10 in steps of 10^(1/24) ~ 1.1x,
# wide enough for EASE scores (best T ~ 0.01-0.03) and SASRec logits (best T ~ 1.6-2.0 on Beauty)
HELDOUT_TEMPERATURE_GRID = tuple(float(x) for x in np.logspace(-3, 1, 97))


def fit_temperature(teacher: Teacher, seqs: list[list[int]], grid: Sequence[float] | None = None,
                    last_only: bool = False) -> tuple[float, dict[float, float]]:
    """The softmax temperature of ``teacher``'s logits that minimises the mean negative log-likelihood (nats) of
    each sequence's next item given its prefix, over ``seqs`` (item ids; sequences of one item are skipped; next
    items the teacher gives ``-inf`` are left out) and a log-spaced ``grid`` (default 10^-3 .. 10^1, 25 values).
    Every next item of a sequence is scored by default: fitted on the sequences the student trains on (in-sample),
    the temperature tends to come out low. ``last_only``: only the last item of each sequence is scored (given all
    the items before it): for held-out rows, e.g. each user's validation item after its history, whose earlier
    positions are training positions; the fit then calibrates the teacher on items it never trained on (Guo et al.,
    "On Calibration of Modern Neural Networks", ICML 2017: temperature scaling fitted on a validation set).
    T = 1 is always evaluated (added to the grid), so ``nll[1.0]`` is the teacher's NLL as it is.
    Returns (best T, {T: NLL}). Raises ``ValueError`` without a sequence of two or more items or without a next
    item the teacher allows. A best T on the grid's edge is a bound, not a fit: widen the grid."""
    seqs = [list(s) for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError("fit_temperature needs sequences of two or more items")
    grid = sorted({float(x) for x in (list(grid) if grid is not None else np.logspace(-3, 1, 25))} | {1.0})
    tot = dict.fromkeys(grid, 0.0)
    n = 0
    for c in range(0, len(seqs), 16):  # in chunks: a chunk's logits are (positions, n_items)
        chunk = seqs[c : c + 16]
        logits = teacher(chunk).float()
        target = torch.as_tensor([a for s in chunk for a in s[1:]], dtype=torch.long)
        if last_only:  # the teacher's rows are the sequences' positions in order: keep each sequence's last one
            ends = torch.as_tensor(np.cumsum([len(s) - 1 for s in chunk]) - 1, dtype=torch.long)
            logits, target = logits[ends], target[ends]
        keep = torch.isfinite(logits.gather(1, target.unsqueeze(1)).squeeze(1))  # targets the teacher rules out: skipped
        logits, target = logits[keep], target[keep]
        for T in grid:
            lp = torch.log_softmax(logits / T, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
            tot[T] += float(-lp.sum())
        n += len(target)
    if n == 0:
        raise ValueError("fit_temperature: the teacher gives every next item of these sequences -inf")
    nll = {T: v / n for T, v in tot.items()}
    best = min(nll, key=nll.get)
    return best, nll


def teacher_fingerprint(*arrays, **params) -> str:
    """A short sha256 of a teacher's weights (numpy arrays or tensors, in order) and its ``params`` (JSON-able),
    for ``run_finetune(teacher_fingerprint=...)``: checkpoints trained against another teacher are not resumed."""
    arrs = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in arrays]
    return json_fingerprint({"params": params, "arrays": [array_fingerprint(a) for a in arrs]})
