"""Training rows for the two SFT phases: task-weighted sampling, the general-text mix, the self-distilled
English replay mix, and tokenization with completion-only labels."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch

from animind_assets.lib.common.fingerprint import json_fingerprint
from animind_assets.lib.llm.model_folder import (
    prompt_ids,
    render_prompt,
)
from animind_assets.lib.common.progress import fmt_seconds
from animind_assets.lib.semantic_ids.tokens import sid_tokens_used as sid_tokens_used
from animind_assets.lib.llm.finetune_config import ROW_SAMPLING_MODES, FinetuneConfig, LogFn, noop_log

# ---------------------------------------------------------------------------------------- prompts
def encode_example(tokenizer, system, prompt, completion, use_chat_template=True, prefix: str = "") -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask): prompt tokens, then completion tokens + EOS (mask 1). ``prefix``: answer-turn
    text after the rendered prompt that is context, not scored (mask 0), tokenized with the prompt exactly as
    the evaluation does (the history's IDs of the "sequence" form's held-out rows)."""
    p = prompt_ids(tokenizer, render_prompt(tokenizer, system, prompt, use_chat_template) + prefix, use_chat_template)
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, [0] * len(p) + [1] * len(c)


def load_general_mix(path: str) -> list[dict]:
    """Rows of a local JSONL file as {system, prompt, completion} (``messages`` rows are converted)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"general_mix_file not found: {path}")
    rows = []
    with open(p, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {i}: not JSON ({exc})") from exc
            if "messages" in r:
                msgs = r["messages"]
                sys_m = next((m["content"] for m in msgs if m["role"] == "system"), None)
                user = [m["content"] for m in msgs if m["role"] == "user"]
                asst = [m["content"] for m in msgs if m["role"] == "assistant"]
                if not user or not asst:
                    raise ValueError(f"{path} line {i}: messages need a user and an assistant turn")
                rows.append({"system": sys_m, "prompt": user[0], "completion": asst[0]})
            elif "prompt" in r and "completion" in r:
                rows.append({"system": r.get("system"), "prompt": r["prompt"], "completion": r["completion"]})
            else:
                raise ValueError(f"{path} line {i}: needs 'messages' or 'prompt'+'completion'")
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


@torch.no_grad()
def self_distill_rows(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 96, use_chat_template: bool = True,
    batch_size: int = 8, log: LogFn = noop_log,
) -> list[dict]:
    """The model's own greedy answers to ``prompts`` as training rows {system: None, prompt,
    completion} (the English-retention replay mix). Call it on the *base* model before any
    fine-tuning. Prompts are rendered exactly as training renders them (``render_prompt``), left
    padded, decoded without special tokens; empty answers are dropped (counted in the log)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[dict] = []
    empty = 0
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        chunk = list(prompts[s : s + batch_size])
        ids = [prompt_ids(tokenizer, render_prompt(tokenizer, None, p, use_chat_template), use_chat_template) for p in chunk]
        L = max(len(x) for x in ids)
        inp = torch.full((len(ids), L), pad, dtype=torch.long)
        att = torch.zeros((len(ids), L), dtype=torch.long)
        for i, x in enumerate(ids):
            inp[i, L - len(x) :] = torch.tensor(x)
            att[i, L - len(x) :] = 1
        gen = model.generate(input_ids=inp.to(dev), attention_mask=att.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for p, row in zip(chunk, gen[:, L:].tolist()):
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            if text:
                rows.append({"system": None, "prompt": p, "completion": text})
            else:
                empty += 1
        done = min(s + batch_size, len(prompts))
        el = time.perf_counter() - t0
        log(f"replay mix: {done}/{len(prompts)} answers generated ({done / max(el, 1e-9):.2f} prompts/s, "
            f"ETA {fmt_seconds(el / done * (len(prompts) - done))})")
    if was_training:
        model.train()
    if empty:
        log(f"replay mix: {empty} empty answers dropped")
    return rows


def replay_rows(model, tokenizer, cfg: FinetuneConfig, cache_dir: Path | None, log: LogFn = noop_log) -> list[dict]:
    """``self_distill_rows`` on the shipped prompts (``lib/llm/replay_prompts.py``, the first
    ``cfg.replay_prompts``), cached as JSONL under ``cache_dir`` keyed by base model and settings
    (``None``: no cache, e.g. an injected test model)."""
    from animind_assets.lib.llm.replay_prompts import PROMPTS

    prompts = PROMPTS[: cfg.replay_prompts] if cfg.replay_prompts > 0 else list(PROMPTS)
    key = json_fingerprint({"base": cfg.base_model, "gguf": cfg.gguf_file, "rev": cfg.revision, "prompts": prompts,
                            "max_new": cfg.replay_max_new_tokens, "chat": cfg.use_chat_template})
    path = cache_dir / f"replay_{key}.jsonl" if cache_dir is not None else None
    if path is not None and path.exists():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        log(f"replay mix: {len(rows)} self-distilled rows from cache {path}")
        return rows
    rows = self_distill_rows(model, tokenizer, prompts, cfg.replay_max_new_tokens, cfg.use_chat_template, log=log)
    if not rows:
        raise ValueError("replay mix: the base model produced no non-empty answer")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
    return rows


def phase_rows(
    train: pl.DataFrame, weights: dict[str, float], n: int, seed: int, general: list[dict] | None = None,
    general_ratio: float = 0.0, replay: list[dict] | None = None, replay_ratio: float = 0.0, sampling: str = "passes",
) -> tuple[list[dict], dict[str, int]]:
    """``n`` training rows, seeded: ``round(n * general_ratio)`` from ``general``, ``round(n * replay_ratio)`` from
    ``replay`` (self-distilled rows), the rest from the tasks A/B/C of ``train`` by ``weights``. Rows are dicts with
    system, prompt, completion (task rows also task, template, target_anime_id). Returns (rows, counts per source).

    ``sampling`` (``FinetuneConfig.row_sampling``):

    * ``"passes"``: the source of each position is drawn at random (tasks by weight, general/replay at random
      positions); each source's rows come in seeded random passes over its pool (a permutation, then a new one when
      it is used up). So the first ``k`` rows of a source are distinct while ``k`` is at most its pool size, and a
      fine-tune stopped early (time budget) has seen as many distinct rows as it has rows. The returned order is
      the training order (the Trainer must keep it: ``length_grouped_order`` + a sequential sampler).
    * ``"replacement"``: every row drawn with replacement, then one global shuffle (the rule before 3 Dec 2026; k
      draws from a pool of N hold about N(1 - exp(-k/N)) distinct rows).

    Raises ValueError when no task has rows and weight > 0, or for an unknown ``sampling``."""
    if sampling not in ROW_SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {'|'.join(ROW_SAMPLING_MODES)}, got {sampling!r}")
    rng = np.random.default_rng(seed)
    cols = [c for c in ("system", "prompt", "completion", "task", "template", "target_anime_id") if c in train.columns]
    pools = {t: train.filter(pl.col("task") == t).select(cols).to_dicts() for t in ("A", "B", "C")}
    w = {t: (weights.get(t, 0.0) if pools[t] else 0.0) for t in pools}
    tot = sum(w.values())
    if tot <= 0:
        raise ValueError(f"no training rows for the tasks weighted {weights}")
    n_gen = int(round(n * general_ratio)) if general else 0
    n_rep = int(round(n * replay_ratio)) if replay else 0
    tasks = rng.choice(["A", "B", "C"], size=n - n_gen - n_rep, p=[w[t] / tot for t in ("A", "B", "C")])
    counts = {"A": 0, "B": 0, "C": 0, "general": n_gen, "replay": n_rep}
    if sampling == "replacement":
        rows = []
        for t in tasks.tolist():
            rows.append(pools[t][int(rng.integers(0, len(pools[t])))])
            counts[t] += 1
        for _ in range(n_gen):
            rows.append(general[int(rng.integers(0, len(general)))])
        for _ in range(n_rep):
            rows.append(replay[int(rng.integers(0, len(replay)))])
        order = rng.permutation(len(rows))
        return [rows[i] for i in order], counts
    sources = tasks.tolist() + ["general"] * n_gen + ["replay"] * n_rep
    if n_gen + n_rep:  # general / replay rows at random positions among the task rows
        sources = [sources[i] for i in rng.permutation(len(sources))]
    all_pools = {**pools, "general": general or [], "replay": replay or []}
    passes = {src: _PassOrder(len(all_pools[src]), rng) for src in all_pools if all_pools[src]}
    rows = []
    for src in sources:
        rows.append(all_pools[src][passes[src].next()])
        if src in ("A", "B", "C"):
            counts[src] += 1
    return rows, counts


class _PassOrder:
    """Indices 0..n-1 in seeded random passes: a permutation, then a fresh one when it is used up."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng, self.order, self.pos = n, rng, np.empty(0, dtype=np.int64), 0

    def next(self) -> int:
        if self.pos >= len(self.order):
            self.order, self.pos = self.rng.permutation(self.n), 0
        self.pos += 1
        return int(self.order[self.pos - 1])


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, window_batches: int = 50) -> list[int]:
    """A training order of rows ``0..len(lengths)-1`` that keeps their sequence at the scale of windows and pads little:
    consecutive windows of ``window_batches * batch_size`` rows; inside a window the rows are sorted by length
    (``lengths``: tokens per row, int) and cut into batches, and the batches are shuffled (seeded). Rows never move to
    another window, so a row order of passes (``phase_rows(sampling="passes")``) keeps its no-repeat property up to one
    window. The per-window sort follows ``transformers``' length-grouped sampler (mega-batches of 50 batches), without
    its global shuffle. Raises ValueError when ``batch_size`` or ``window_batches`` is < 1."""
    if batch_size < 1 or window_batches < 1:
        raise ValueError(f"batch_size ({batch_size}) and window_batches ({window_batches}) must be >= 1")
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    size = batch_size * window_batches
    order: list[int] = []
    for start in range(0, len(lengths), size):
        idx = np.arange(start, min(start + size, len(lengths)))
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        for b in rng.permutation(len(batches)).tolist():
            order.extend(batches[b].tolist())
    return order


def tokenize_rows(tokenizer, rows: list[dict], max_len: int, use_chat_template: bool) -> tuple[dict[str, list], int]:
    ids, masks, dropped = [], [], 0
    for r in rows:
        x, m = encode_example(tokenizer, r.get("system"), r["prompt"], r["completion"], use_chat_template, r.get("prefix", ""))
        if len(x) > max_len:
            dropped += 1
            continue
        ids.append(x)
        masks.append(m)
    return {"input_ids": ids, "completion_mask": masks}, dropped
