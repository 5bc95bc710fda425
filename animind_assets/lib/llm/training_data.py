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
from animind_assets.lib.llm.finetune_config import FinetuneConfig, LogFn, noop_log

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
    general_ratio: float = 0.0, replay: list[dict] | None = None, replay_ratio: float = 0.0,
) -> tuple[list[dict], dict[str, int]]:
    """``n`` training rows drawn (with replacement, seeded): ``round(n * general_ratio)`` from
    ``general``, ``round(n * replay_ratio)`` from ``replay`` (self-distilled rows), the rest from
    the tasks by ``weights``. Rows are dicts with system, prompt, completion (task rows also task,
    template, target_anime_id). Returns (rows in seeded random order, counts per source)."""
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
    rows, counts = [], {"A": 0, "B": 0, "C": 0, "general": n_gen, "replay": n_rep}
    for t in tasks.tolist():
        rows.append(pools[t][int(rng.integers(0, len(pools[t])))])
        counts[t] += 1
    for _ in range(n_gen):
        rows.append(general[int(rng.integers(0, len(general)))])
    for _ in range(n_rep):
        rows.append(replay[int(rng.integers(0, len(replay)))])
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], counts


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
