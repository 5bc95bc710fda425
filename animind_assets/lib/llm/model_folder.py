"""The contract of a ``finetuned_model`` folder, shared by training (``llm_finetune``) and inference
(``llm_infer``) so that inference never imports the trainer.

A folder holds:

* the Hugging Face model (``config.json`` + ``model.safetensors``) and tokenizer files, the
  tokenizer extended with the semantic-ID level tokens and ``SPECIAL_TOKENS``
  (format: ``lib/semantic_ids/tokens.py``);
* ``sid_lookup.parquet`` (``LOOKUP_FILE``): anime_id Int64, semantic_id Utf8, title Utf8 and
  optional name / english_name / year / type: the only items the model may name;
* ``animind_llm.json`` (``INFO_FILE``): prompt format version, system prompt, whether the chat
  template is used, special tokens, ID depth, training configuration and metrics;
* ``history.json`` (``HISTORY_FILE``): the training log rows.

Prompt rendering lives here because the model must see exactly the same text at training and at
inference time: the task-B list prompt (``watch_item`` / ``b_prompt`` / ``recommend_prompt``, the
one used by ``recommend``) and the chat wrapping (``render_prompt`` / ``prompt_ids``). Changing
any of them means raising ``PROMPT_FORMAT_VERSION``.

This module never imports Dagster.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from animind_assets.lib.llm.dataset_schema import SEQUENCE_TEMPLATE  # noqa: F401  (public API here too)
from animind_assets.lib.semantic_ids.tokens import ANIME_END, ANIME_START, LIKED, SPECIAL_TOKENS, split_sid

INFO_FILE = "animind_llm.json"
LOOKUP_FILE = "sid_lookup.parquet"
HISTORY_FILE = "history.json"
REQUIRED_FILES = (INFO_FILE, LOOKUP_FILE, "config.json")
LOOKUP_COLUMNS = ("anime_id", "semantic_id", "title", "name", "english_name", "year", "type")
PROMPT_FORMAT_VERSION = 1
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = SPECIAL_TOKENS
MASK = "[MASK]"
LIST_ORDERS = {
    "watch": "in watch order",  # timestamps: the list is a real sequence
    "list": "in list order",  # the source's row order, not time (MAL 2020: ascending MAL id)
    "set": "in no particular order",  # set completion: items shown in a seeded random order
}


# --------------------------------------------------------------------------------------- prompts
def watch_item(sid: str, sentiment: str | None) -> str:
    """One list entry: ``<anime_start>{sid}<anime_end>{sentiment}`` (sentiment may be empty)."""
    return f"{ANIME_START}{sid}{ANIME_END}{sentiment or ''}"


def masked_item() -> str:
    """The masked list entry ``<anime_start>[MASK]<anime_end>``."""
    return f"{ANIME_START}{MASK}{ANIME_END}"


def list_order_key(order: str | bool) -> str:
    """``"watch"`` / ``"list"`` / ``"set"`` (a bool is the legacy ``temporal`` flag: True = watch)."""
    if isinstance(order, bool):
        return "watch" if order else "list"
    if order not in LIST_ORDERS:
        raise ValueError(f"list order must be one of {sorted(LIST_ORDERS)}, got {order!r}")
    return order


def list_order_of(prompts: Sequence[str]) -> str:
    """The list order the task-B prompts were written with (``"list"`` when none says)."""
    for key in ("set", "watch", "list"):
        if any(f"({LIST_ORDERS[key]})" in p for p in prompts):
            return key
    return "list"


def b_prompt(items: Sequence[str], mask_pos: int, order: str | bool) -> str:
    """Task B prompt. ``items`` are rendered watch items (``watch_item``); the item at ``mask_pos``
    (``len(items)`` = append a masked next item) is replaced by the mask. ``order``: how the list
    is ordered (``LIST_ORDERS`` key, or the legacy bool ``temporal``); it is stated in the prompt."""
    parts = list(items)
    if mask_pos >= len(parts):
        parts.append(masked_item())
    else:
        parts[mask_pos] = masked_item()
    header = LIST_ORDERS[list_order_key(order)]
    return (
        f"A user's anime list ({header}): {' '.join(parts)}\n"
        f"Which anime is hidden at {MASK}? Answer with its semantic ID."
    )




def sequence_prefix(history: Sequence[int], sids) -> str:
    """The answer-turn text that precedes the next ID in the "sequence" form: the history's IDs in the order
    given, concatenated (``sids``: item id -> semantic ID). Training completions are ``sequence_prefix(window[:-1])
    + sids[window[-1]]``; evaluation and ``recommend`` render the prompt, append this and decode. KeyError names
    an item without an ID."""
    try:
        return "".join(sids[int(a)] for a in history)
    except KeyError as exc:
        raise KeyError(f"item {exc.args[0]} of the history has no semantic ID") from None


def list_sequence_prompt(order: str = "set") -> str:
    """Task-B prompt of the "sequence" form for user lists (``llm_prep_dataset``): the same text for every row,
    the list's IDs follow in the answer turn. States the order (``LIST_ORDERS`` key) like ``b_prompt``."""
    return f"Write the anime on a user's list as semantic IDs ({LIST_ORDERS[list_order_key(order)]})."


def recommend_prompt(sids: Sequence[str], sentiments: Sequence[str | None] | None = None, temporal: bool | str = False) -> str:
    """The held-out-item prompt used by evaluation and the ``recommend`` CLI (task B, mask
    appended). ``temporal``: list order (``LIST_ORDERS`` key or the legacy bool)."""
    sentiments = list(sentiments) if sentiments is not None else [LIKED] * len(sids)
    items = [watch_item(s, t) for s, t in zip(sids, sentiments)]
    return b_prompt(items, len(items), list_order_key(temporal))


def render_prompt(tokenizer, system: str | None, prompt: str, use_chat_template: bool = True) -> str:
    """The exact text the model sees before its answer (training and inference share it): the
    tokenizer's chat template with a generation prompt when it has one and ``use_chat_template``,
    else ``"{system}\\n\\n### Question:\\n{prompt}\\n### Answer:\\n"``."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head = f"{system}\n\n" if system else ""
    return f"{head}### Question:\n{prompt}\n### Answer:\n"


def prompt_ids(tokenizer, text: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of a rendered prompt (no BOS/EOS added when the chat template already carries them)."""
    templated = use_chat_template and getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def token_ids(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Ids of tokens that must already be in the vocabulary; ValueError naming the missing ones."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    unk = tokenizer.unk_token_id
    bad = [t for t, i in zip(tokens, ids) if i is None or (unk is not None and i == unk)]
    if bad:
        raise ValueError(f"tokens not in the tokenizer: {bad[:5]}")
    return [int(i) for i in ids]


def sid_token_ids(tokenizer, semantic_id: str) -> tuple[int, ...]:
    """Token ids of one semantic ID (one id per level token). ValueError when the string is not a
    semantic ID or a level token is missing from the tokenizer."""
    toks = split_sid(semantic_id)
    try:
        return tuple(token_ids(tokenizer, toks))
    except ValueError as exc:
        raise ValueError(f"semantic ID {semantic_id} has tokens missing from the tokenizer ({exc})") from exc


# --------------------------------------------------------------------------------------- files
def write_folder_files(dest: str | os.PathLike, lookup: pl.DataFrame, info: dict, history: list[dict] | None = None) -> None:
    """Write ``LOOKUP_FILE``, ``INFO_FILE`` and ``HISTORY_FILE`` into ``dest`` (the model and
    tokenizer are written by their ``save_pretrained``). ``lookup`` needs anime_id, semantic_id, title."""
    dest = Path(dest)
    missing = [c for c in ("anime_id", "semantic_id", "title") if c not in lookup.columns]
    if missing:
        raise ValueError(f"lookup table lacks column(s) {missing}; it has {lookup.columns}")
    cols = [c for c in LOOKUP_COLUMNS if c in lookup.columns]
    lookup.select(cols).write_parquet(dest / LOOKUP_FILE)
    (dest / INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    (dest / HISTORY_FILE).write_text(json.dumps(history or [], indent=1, default=str), encoding="utf-8")


def check_model_folder(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path; FileNotFoundError naming the first missing required file."""
    folder = Path(folder)
    for name in REQUIRED_FILES:
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} not found: {folder} is not a finetuned_model folder")
    return folder


def read_folder_files(folder: str | os.PathLike) -> tuple[dict, pl.DataFrame]:
    """(info dict, lookup frame) of a model folder. FileNotFoundError when a required file is
    missing; ValueError when the info says ``finished: false`` (an unfinished fine-tune) or its
    prompt format is newer than this code understands."""
    folder = check_model_folder(folder)
    info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    if info.get("finished") is False:
        raise ValueError(f"{folder / INFO_FILE} says finished=false: {folder} holds an unfinished fine-tune; re-run finetuned_model")
    version = int(info.get("prompt_format_version", PROMPT_FORMAT_VERSION))
    if version > PROMPT_FORMAT_VERSION:
        raise ValueError(f"{folder / INFO_FILE}: prompt_format_version {version} is newer than this code ({PROMPT_FORMAT_VERSION})")
    return info, pl.read_parquet(folder / LOOKUP_FILE)
