"""Inference with a fine-tuned semantic-ID model: load the model folder, constrained beam search over
a trie of valid semantic IDs (``lib/semantic_ids/trie.py``), mapping IDs back to anime.

Only real anime can come out of ``rank_items``: every generated sequence is a path of the trie
(semantic-ID tokens followed by EOS), and each trie leaf carries its anime_id.

This module never imports Dagster.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl
import torch

from animind_assets.lib.llm.id_input_rows import attach_saved, saved_entry
from animind_assets.lib.llm.model_folder import (prompt_ids, read_folder_files, recommend_prompt, render_prompt, sequence_prefix,
                                                 sid_token_ids, token_ids)
from animind_assets.lib.semantic_ids.tokens import LIKED, leading_sid
from animind_assets.lib.semantic_ids.trie import SidTrie


@dataclass
class SidModel:
    model: object
    tokenizer: object
    lookup: pl.DataFrame  # anime_id, semantic_id, title, ...
    info: dict
    sid_ids: dict[int, tuple[int, ...]] = field(default_factory=dict)  # anime_id -> token ids
    by_sid: dict[str, int] = field(default_factory=dict)  # semantic_id -> anime_id
    titles: dict[int, str] = field(default_factory=dict)
    sids: dict[int, str] = field(default_factory=dict)
    _full_tries: dict[bool, SidTrie] = field(default_factory=dict, repr=False)  # end -> trie of every ID (built once, reused)
    _sid_index: torch.Tensor | None = field(default=None, repr=False)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def use_chat_template(self) -> bool:
        return bool(self.info.get("use_chat_template", True))

    @property
    def system_prompt(self) -> str:
        return self.info.get("system_prompt") or ""

    @property
    def sid_softmax(self) -> bool:
        """True when the model was trained with ID tokens normalised among themselves (``FinetuneConfig.sid_softmax``)."""
        return bool(self.info.get("sid_softmax", False))

    def sid_index(self) -> torch.Tensor:
        """(S,) int64, sorted (built once): the ID vocabulary the ``sid_softmax`` loss used (``info['sid_softmax_tokens']``,
        so a lookup filtered at inference does not change the normaliser), else every ID token of the lookup's IDs."""
        if self._sid_index is None:
            toks = self.info.get("sid_softmax_tokens") or []
            ids = (token_ids(self.tokenizer, toks) if toks else [t for v in self.sid_ids.values() for t in v])
            self._sid_index = torch.tensor(sorted(set(ids)), dtype=torch.long)
        return self._sid_index

    def render(self, prompt: str) -> str:
        return render_prompt(self.tokenizer, self.system_prompt, prompt, self.use_chat_template)

    def trie(self, exclude: Iterable[int] = (), end: bool = True) -> SidTrie:
        """Trie of every item's ID tokens (+ EOS when ``end``), leaves = item ids, without ``exclude``. The
        trie of every item is built once per ``end`` and shared (callers only read it). ``end=False`` for
        answers that continue after the ID (the "sequence" form of ``lib/llm/sequence_data.py``); ``SidTrie``
        then raises ValueError when one item's ID is a prefix of another's."""
        ex = set(int(a) for a in exclude)
        if not ex and end in self._full_tries:
            return self._full_tries[end]
        trie = SidTrie(end_token_id=self.eos_id if end else None)
        for aid, ids in self.sid_ids.items():
            if aid not in ex:
                trie.add(ids, item=aid)
        if not ex:
            self._full_tries[end] = trie
        return trie


def make_sid_model(model, tokenizer, lookup: pl.DataFrame, info: dict) -> SidModel:
    sm = SidModel(model=model, tokenizer=tokenizer, lookup=lookup, info=info)
    for r in lookup.select("anime_id", "semantic_id", "title").iter_rows(named=True):
        aid = int(r["anime_id"])
        sm.sid_ids[aid] = sid_token_ids(tokenizer, r["semantic_id"])
        sm.by_sid[r["semantic_id"]] = aid
        sm.sids[aid] = r["semantic_id"]
        sm.titles[aid] = r["title"] or str(aid)
    return sm


#: the weights' dtypes ``load_sid_model`` accepts (the one list: the launchpad ``dtype`` fields and ``--eval-dtype`` use it)
InferenceDtype = Literal["float32", "bfloat16"]
INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INFERENCE_DTYPE_HELP = ("weights' dtype for the whole evaluation (search, linking, unconstrained check): float32 (the "
                        "reference) | bfloat16 (faster on AMX CPUs and GPUs; near-tied items may change places)")


def load_sid_model(folder: str | os.PathLike, num_threads: int = 0, device: str = "", dtype: str = "float32") -> SidModel:
    """Load a ``finetuned_model`` folder (model, tokenizer, ``sid_lookup.parquet``, ``animind_llm.json``).

    ``dtype``: the weights' dtype for inference, "float32" (default; the reference for every reported figure) or
    "bfloat16" (about half the memory, and faster on CPUs with AMX-BF16 and on GPUs; beam scores differ in
    the last digits, so a few near-tied items change places; ``step_log_probs`` still normalises in float32).
    A folder trained with ``FinetuneConfig.id_input_rows`` gets its input-side ID rows attached again
    (``lib/llm/id_input_rows.py``). ValueError for another dtype, and (naming the file) for an ``animind_llm.json``
    whose config says ``id_input_rows`` without a usable entry or a rows file that is unreadable or of another shape;
    FileNotFoundError when the info lists ID input rows whose file is missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(INFERENCE_DTYPES)}, got {dtype!r}")
    folder = Path(folder)
    info, lookup = read_folder_files(folder)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    from animind_assets.lib.common.device import resolve_device

    dev = resolve_device(device or "auto")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=INFERENCE_DTYPES[dtype]).to(dev)
    model.eval()
    entry = saved_entry(folder, info)  # input-side ID rows of a fine-tune with FinetuneConfig.id_input_rows
    if entry is not None:
        attach_saved(model, folder, entry)
    return make_sid_model(model, tok, lookup, info)


def _batch_inputs(sm: SidModel, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded (B, L) int64 ``input_ids`` and ``attention_mask`` (1 on real tokens) of rendered prompts, on the
    model's device; pad id = the tokenizer's, else EOS (masked out either way)."""
    ids = [prompt_ids(sm.tokenizer, t, sm.use_chat_template) for t in texts]
    L = max(len(x) for x in ids)
    pad = sm.tokenizer.pad_token_id if sm.tokenizer.pad_token_id is not None else sm.eos_id
    inp = torch.full((len(ids), L), pad, dtype=torch.long)
    att = torch.zeros((len(ids), L), dtype=torch.long)
    for i, x in enumerate(ids):  # left padding: every prompt ends at the same position
        inp[i, L - len(x) :] = torch.tensor(x)
        att[i, L - len(x) :] = 1
    dev = next(sm.model.parameters()).device
    return {"input_ids": inp.to(dev), "attention_mask": att.to(dev)}


@dataclass
class RankOutput:
    items: list[list[tuple[int, float]]]  # per prompt: (anime_id, beam score), best first
    sequences: int = 0
    valid_sequences: int = 0


def step_log_probs(sm: SidModel, logits: torch.Tensor) -> torch.Tensor:
    """(B, V) next-token logits -> (B, V) float32 log-probabilities as the model was trained: the full-vocabulary
    log-softmax, and for a ``sid_softmax`` model the ID tokens' entries replaced by their log-softmax among the
    ID tokens only (``lib/llm/losses.completion_loss`` with ``sid_vocab``)."""
    logp = torch.log_softmax(logits.float(), -1)
    if sm.sid_softmax:
        idx = sm.sid_index().to(logits.device)
        logp[:, idx] = torch.log_softmax(logits[:, idx].float(), -1)
    return logp


@torch.no_grad()
def trie_beam_search(sm: SidModel, prompt_text: str, trie: SidTrie, num_beams: int) -> list[tuple[tuple[int, ...], float]]:
    """Beam search over ``trie`` paths for one rendered prompt (``trie_beam_search_batch`` with one prompt).
    Returns complete trie paths with their scores (sum of the tokens' log-probabilities), best first."""
    return trie_beam_search_batch(sm, [prompt_text], [trie], num_beams)[0]


def cache_keyword(model) -> str:
    """The keyword ``model.forward`` takes the KV cache by: ``"cache"`` where transformers has renamed it (5.x,
    where ``past_key_values`` is deprecated and goes away in 5.40), else ``"past_key_values"``.

    Read from the signature of the underlying transformers model's ``forward`` (a PEFT wrapper is unwrapped):
    passing the new name to an older model would be swallowed by its ``**kwargs`` and the cache silently ignored.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword_of(type(base))


@functools.lru_cache(maxsize=None)
def _cache_keyword_of(model_class: type) -> str:
    """``cache_keyword`` per model class, read once (the search asks at every batch)."""
    try:
        params = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a readable signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache of a forward output: ``out.cache`` (transformers 5.x) or ``out.past_key_values`` (older)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def trie_beam_search_batch(sm: SidModel, prompt_texts: Sequence[str], tries: Sequence[SidTrie],
                           num_beams: int | Sequence[int]) -> list[list[tuple[tuple[int, ...], float]]]:
    """Beam search over trie paths for several rendered prompts at once; prompt i searches ``tries[i]`` with
    ``num_beams`` (or ``num_beams[i]``) beams.

    The prompts are left-padded into one (B, L) batch with their own position ids (0..len-1, so each row sees
    exactly the positions it would alone) and run once; their KV cache is then copied for the beams, and every
    decoding step runs the live beams of all prompts as one batch (rows = sum of live beams). On a CPU the steps
    are mostly compute-bound, so batching gains less than the batch size (measured: 1.36x users/s at 8 prompts).
    Scores are sums of the tokens' log-probabilities (``step_log_probs``: full-vocabulary, as in ``generate``;
    among the ID tokens for a ``sid_softmax`` model). A prompt stops once its best live beam scores below its
    ``num_beams``-th finished path (log-probabilities only fall as a path grows).

    Returns, per prompt, complete trie paths (token-id tuples, ending in EOS when the trie has an end token)
    with their float scores, best first, at most ``num_beams`` (none for an empty trie). ValueError when ``tries``
    (or a per-prompt ``num_beams``) has another length than ``prompt_texts``, or a beam count is below 1.

    Memory: the KV cache holds about ``sum(beams) x (longest prompt + depth) x kv_bytes_per_token(sm)`` bytes, and a
    reorder step copies it (peak about twice that): callers bound it through the number of prompts per call."""
    n = len(prompt_texts)
    beams_per = [int(num_beams)] * n if isinstance(num_beams, numbers.Integral) else [int(b) for b in num_beams]
    if len(tries) != n or len(beams_per) != n:
        raise ValueError(f"{n} prompts need as many tries and beam counts (got {len(tries)} and {len(beams_per)})")
    if any(b < 1 for b in beams_per):
        raise ValueError(f"num_beams must be >= 1, got {min(beams_per)}")
    if n == 0:
        return []
    model = sm.model
    enc = _batch_inputs(sm, prompt_texts)  # left padding: every prompt ends at the same position
    inp, att = enc["input_ids"], enc["attention_mask"]
    dev = inp.device
    lens = att.sum(-1).tolist()
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    try:
        out = model(input_ids=inp, attention_mask=att, position_ids=pos, use_cache=True, logits_to_keep=1)
    except TypeError:  # models without logits_to_keep
        out = model(input_ids=inp, attention_mask=att, position_ids=pos, use_cache=True)
    cache_kw = cache_keyword(model)
    cache = output_cache(out)
    logp = step_log_probs(sm, out.logits[:, -1]).cpu()
    # live rows of the batch: (prompt, tokens, score); row r of logp belongs to rows[r]
    rows: list[tuple[int, tuple[int, ...], float]] = [(i, (), 0.0) for i in range(n)]
    finished: list[list[tuple[tuple[int, ...], float]]] = [[] for _ in range(n)]
    step = 0
    while rows:
        by_prompt: dict[int, list[tuple[float, int, tuple[int, ...]]]] = {}
        for r, (i, toks, score) in enumerate(rows):
            allowed = tries[i].allowed(toks)
            if not allowed:
                continue
            lp = logp[r, allowed].tolist()
            by_prompt.setdefault(i, []).extend((score + v, r, toks + (t,)) for t, v in zip(allowed, lp))
        new_rows: list[tuple[int, tuple[int, ...], float]] = []
        parents: list[int] = []
        for i in sorted(by_prompt):
            cand = sorted(by_prompt[i], key=lambda c: -c[0])[: beams_per[i]]
            keep = []
            for score, r, toks in cand:
                if tries[i].is_complete(toks):
                    finished[i].append((toks, score))
                else:
                    keep.append((score, r, toks))
            k = beams_per[i]
            if len(finished[i]) >= k and (not keep or keep[0][0] < sorted((sc for _, sc in finished[i]), reverse=True)[k - 1]):
                continue
            for score, r, toks in keep:
                new_rows.append((i, toks, score))
                parents.append(r)
        if not new_rows:
            break
        idx = torch.tensor(parents, device=dev)  # at step 0 the rows are the prompts themselves
        cache.reorder_cache(idx)
        att = torch.cat([att[idx], torch.ones((len(parents), 1), dtype=torch.long, device=dev)], dim=-1)
        rows = new_rows
        step += 1
        inp = torch.tensor([[toks[-1]] for _, toks, _ in rows], device=dev)
        pos = torch.tensor([[lens[i] + step - 1] for i, _, _ in rows], device=dev)
        out = model(input_ids=inp, attention_mask=att, position_ids=pos, use_cache=True, **{cache_kw: cache})
        cache = output_cache(out)
        logp = step_log_probs(sm, out.logits[:, -1]).cpu()
    res = []
    for i in range(n):
        finished[i].sort(key=lambda x: -x[1])
        res.append(finished[i][: beams_per[i]])
    return res


@torch.no_grad()
def rank_items(
    sm: SidModel,
    prompts: Sequence[str],
    k: int = 10,
    num_beams: int = 20,
    exclude: Sequence[Iterable[int]] | None = None,
    batch_size: int = 4,
    engine: str = "cached",
    prefixes: Sequence[str] | None = None,
) -> RankOutput:
    """Top-``k`` anime for each (un-rendered) prompt by beam search constrained to the semantic-ID
    trie; ``exclude[i]`` (e.g. the user's own list) is left out of prompt i's trie.

    ``prefixes[i]``: answer-turn text placed after rendered prompt i before decoding (the history's IDs of
    the "sequence" form, ``sequence_data.sequence_prefix``); the answer then continues after the ID, so
    the trie has no EOS and the score is the ID's own log-probability. ``engine="cached"``:
    ``trie_beam_search_batch`` on ``batch_size`` prompts at a time (each prompt encoded once, its KV cache copied to
    its beams, and every decoding step runs the live beams of all the batch's prompts together). ``engine="hf"``:
    ``model.generate(num_beams=..., prefix_allowed_tokens_fn=trie)`` (expands the prompt per beam;
    several times slower on CPU; no ``prefixes``; not for ``sid_softmax`` models: ``generate`` scores with a
    full-vocabulary log-softmax, not the ID-only one they were trained with). ValueError for an unknown engine,
    ``prefixes`` with "hf", "hf" with a ``sid_softmax`` model or a ``prefixes`` of another length."""
    if engine not in ("cached", "hf"):
        raise ValueError(f"engine must be 'cached' or 'hf', got {engine!r}")
    if engine == "hf" and sm.sid_softmax:
        raise ValueError("engine 'hf' cannot score a sid_softmax model as it was trained (generate scores with a "
                         "full-vocabulary log-softmax, not the ID-only one); use engine 'cached'")
    if prefixes is not None and (engine != "cached" or len(prefixes) != len(prompts)):
        raise ValueError(f"prefixes need engine 'cached' and one per prompt ({len(prefixes)} for {len(prompts)} prompts)")
    out = RankOutput(items=[])
    end = prefixes is None
    for s in range(0, len(prompts), batch_size):
        chunk = list(prompts[s : s + batch_size])
        tries = [sm.trie(exclude[s + i] if exclude is not None else (), end=end) for i in range(len(chunk))]
        if engine == "cached":
            pre = list(prefixes[s : s + batch_size]) if prefixes is not None else [""] * len(chunk)
            results = trie_beam_search_batch(sm, [sm.render(p) + x for p, x in zip(chunk, pre)], tries,
                                             [max(1, min(num_beams, len(t))) for t in tries])
        else:
            results = _hf_beam_search(sm, chunk, tries, num_beams)
        for trie, res in zip(tries, results):
            ranked: list[tuple[int, float]] = []
            seen: set[int] = set()
            for seq, score in res:
                seq = list(seq)
                if sm.eos_id in seq:
                    seq = seq[: seq.index(sm.eos_id) + 1]
                out.sequences += 1
                aid = trie.item(seq)
                if aid is None:
                    continue
                out.valid_sequences += 1
                if aid not in seen:
                    seen.add(aid)
                    ranked.append((int(aid), float(score)))
            out.items.append(ranked[:k])
    return out


def _hf_beam_search(sm: SidModel, chunk: list[str], tries: list[SidTrie], num_beams: int) -> list[list[tuple[list[int], float]]]:
    depth = max(len(v) for v in sm.sid_ids.values()) + 1
    beams = max(1, min(num_beams, min(len(t) for t in tries)))
    enc = _batch_inputs(sm, [sm.render(p) for p in chunk])
    plen = enc["input_ids"].shape[1]

    def allowed(batch_id: int, ids: torch.Tensor) -> list[int]:
        nxt = tries[batch_id].allowed(ids[plen:].tolist())
        return nxt if nxt else [sm.eos_id]

    gen = sm.model.generate(
        **enc,
        max_new_tokens=depth,
        num_beams=beams,
        num_return_sequences=beams,
        do_sample=False,
        early_stopping=True,
        prefix_allowed_tokens_fn=allowed,
        pad_token_id=sm.tokenizer.pad_token_id,
        eos_token_id=sm.eos_id,
        return_dict_in_generate=True,
        output_scores=True,
        length_penalty=0.0,
    )
    seqs = gen.sequences[:, plen:].tolist()
    scores = gen.sequences_scores.tolist() if getattr(gen, "sequences_scores", None) is not None else [0.0] * len(seqs)
    return [[(seqs[j], scores[j]) for j in range(i * beams, (i + 1) * beams)] for i in range(len(chunk))]


@torch.no_grad()
def generate_text(sm: SidModel, prompts: Sequence[str], max_new_tokens: int = 24, batch_size: int = 8,
                  prefixes: Sequence[str] | None = None) -> list[str]:
    """Greedy, unconstrained answers (decoded, special tokens kept except EOS/pad). ``prefixes[i]``: answer-turn
    text after rendered prompt i (as in ``rank_items``); the answer returned is what follows it."""
    res = []
    for s in range(0, len(prompts), batch_size):
        pre = list(prefixes[s : s + batch_size]) if prefixes is not None else [""] * len(prompts[s : s + batch_size])
        chunk = [sm.render(p) + x for p, x in zip(prompts[s : s + batch_size], pre)]
        enc = _batch_inputs(sm, chunk)
        gen = sm.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=sm.tokenizer.pad_token_id, eos_token_id=sm.eos_id,
        )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            if sm.eos_id in row:
                row = row[: row.index(sm.eos_id)]
            res.append(sm.tokenizer.decode(row, skip_special_tokens=False).strip())
    return res


def parse_sid(text: str) -> str:
    """The leading run of semantic-ID tokens in a generated text (``sid_tokens.leading_sid``)."""
    return leading_sid(text)


DEFAULT_MAX_BEAMS = 256  # beams at most (each beam holds a copy of the prompt's KV cache)
DEFAULT_MAX_CACHE_BYTES = 2 * 1024**3  # KV-cache budget of one beam search


def context_length(sm: SidModel) -> int:
    """The model's context window in tokens (``max_position_embeddings`` / ``n_positions`` /
    ``max_seq_length`` of its config; the tokenizer's ``model_max_length`` as a fallback)."""
    cfg = getattr(sm.model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(sm.tokenizer, "model_max_length", None)
    return int(v) if isinstance(v, int) and 0 < v < 10**7 else 2048


def kv_bytes_per_token(sm: SidModel) -> int:
    """Bytes of KV cache one token takes in one beam (2 x layers x kv_heads x head_dim x the weights' element size:
    4 bytes in float32, 2 in bfloat16)."""
    cfg = getattr(sm.model, "config", None)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 1)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 1024)
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 1)
    kv_heads = int(getattr(cfg, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(cfg, "head_dim", 0) or hidden // max(1, heads))
    params = getattr(sm.model, "parameters", None)
    elem = next(params()).element_size() if callable(params) else 4
    return 2 * layers * kv_heads * head_dim * elem


@dataclass
class RecommendPlan:
    """What a recommendation request will really do (rule 10 of issue 12), with the reasons."""

    anime_ids: list[int]  # the history kept (most recent last)
    prompt: str
    prompt_tokens: int
    k: int
    num_beams: int
    dropped_history: int = 0  # oldest items left out to fit the context
    notes: list[str] = field(default_factory=list)
    prefix: str = ""  # "sequence"-form models: the history's IDs, the answer-turn text decoding continues (rank_items prefixes)


def plan_recommendation(
    sm: SidModel,
    anime_ids: Sequence[int],
    sentiments: Sequence[str] | None = None,
    k: int = 10,
    num_beams: int = 0,
    max_beams: int = DEFAULT_MAX_BEAMS,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
) -> RecommendPlan:
    """Bound a request before any model call.

    * history: when the rendered prompt plus the semantic-ID depth does not fit ``context_length(sm)``,
      the OLDEST items are dropped until it fits (the most recent items are kept) and a note says how many;
    * ``k``: at most the number of catalog items outside the history;
    * beams (default ``2k``): at least ``k``, at most the catalog items available, ``max_beams`` and what
      fits ``max_cache_bytes`` of KV cache (``beams x (prompt + depth) x kv_bytes_per_token``); when that
      is fewer than ``k``, ``k`` is lowered to the beams and a note says so.
    Raises ``ValueError`` when not even the most recent item fits the context."""
    ids = [int(a) for a in anime_ids]
    sents = list(sentiments) if sentiments is not None else [LIKED] * len(ids)
    depth = max((len(v) for v in sm.sid_ids.values()), default=4) + 1
    ctx = context_length(sm)
    notes: list[str] = []

    seq_form = sm.info.get("next_id_format") == "sequence"
    if seq_form and sentiments is not None and any(x != LIKED for x in sents):
        notes.append("sentiments ignored: this model was trained on the sequence form of task B, which writes no "
                     "sentiment tokens (every history item is read as listed)")

    def n_tokens(start: int) -> int:
        text = history_prompt(sm, ids[start:], sents[start:])
        n = len(prompt_ids(sm.tokenizer, sm.render(text), sm.use_chat_template))
        if seq_form:
            n += len(sm.tokenizer(history_prefix(sm, ids[start:]), add_special_tokens=False)["input_ids"])
        return n

    start = 0
    if n_tokens(0) + depth > ctx:
        lo, hi = 1, len(ids)  # smallest start whose prompt fits
        if n_tokens(len(ids) - 1) + depth > ctx:
            raise ValueError(f"even the most recent history item does not fit the model context of {ctx} tokens")
        while lo < hi:
            mid = (lo + hi) // 2
            if n_tokens(mid) + depth <= ctx:
                hi = mid
            else:
                lo = mid + 1
        start = lo
        notes.append(
            f"history of {len(ids)} items is longer than the model context ({ctx} tokens): kept the {len(ids) - start} "
            f"most recent, dropped the {start} oldest"
        )
    kept_ids, kept_sents = ids[start:], sents[start:]
    prompt = history_prompt(sm, kept_ids, kept_sents)
    p_tokens = n_tokens(start)
    available = len(set(sm.sid_ids) - set(ids))
    if available < 1:
        raise ValueError("every catalog item is in the history: nothing left to recommend")
    k_eff = max(1, min(int(k), available))
    if k_eff < k:
        notes.append(f"k={k} capped at {k_eff}: the catalog has {available} items outside the history")
    per_beam = max(1, (p_tokens + depth) * kv_bytes_per_token(sm))
    mem_beams = max(1, int(max_cache_bytes // per_beam))
    beams = max(int(num_beams or 2 * k_eff), k_eff)
    cap = min(available, int(max_beams), mem_beams)
    if beams > cap:
        notes.append(
            f"beams {beams} capped at {cap} (catalog {available}, max_beams {max_beams}, KV-cache budget "
            f"{max_cache_bytes / 1024**3:.1f} GiB at {per_beam / 1024**2:.1f} MiB per beam)"
        )
        beams = cap
    if k_eff > beams:
        notes.append(f"k={k_eff} lowered to {beams}: no more beams fit the bounds above")
        k_eff = beams
    return RecommendPlan(kept_ids, prompt, p_tokens, k_eff, beams, start, notes,
                         prefix=history_prefix(sm, kept_ids) if seq_form else "")


def history_prefix(sm: SidModel, anime_ids: Sequence[int]) -> str:
    """The answer-turn prefix of a "sequence"-form model (``info['next_id_format']``): the history's IDs in the
    given order; "" for question-form models (their history is in the prompt)."""
    if sm.info.get("next_id_format") != "sequence":
        return ""
    return sequence_prefix(anime_ids, sm.sids)


def history_prompt(sm: SidModel, anime_ids: Sequence[int], sentiments: Sequence[str] | None = None) -> str:
    """The task-B prompt for a history: the question form lists the IDs (with sentiments) and masks the next
    item; a "sequence"-form model gets its fixed ``info['sequence_prompt']`` (the IDs go into ``history_prefix``)."""
    if sm.info.get("next_id_format") == "sequence":
        return sm.info["sequence_prompt"]
    sents = list(sentiments) if sentiments is not None else [LIKED] * len(anime_ids)
    order = sm.info.get("list_order") or ("watch" if sm.info.get("order_is_temporal") else "list")
    return recommend_prompt([sm.sids[a] for a in anime_ids], sents, temporal=order)
