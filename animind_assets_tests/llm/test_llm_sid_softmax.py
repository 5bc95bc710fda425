"""``FinetuneConfig.sid_softmax``: at answer positions whose target is a semantic-ID token the loss normalises over
the ID tokens only, the trie-constrained decoder scores the same way (``lib/llm/infer.step_log_probs``), the
distilled targets land on the right columns, the head's base rows get no gradient from ID targets, and a model
folder records it so every consumer scores it as it was trained."""

from __future__ import annotations

import pytest
import torch

from animind_assets.lib.llm.losses import SidVocab, completion_loss
from animind_assets_tests.llm.test_llm_beauty import CFG, SEQ_CFG, tiny_beauty
from animind_assets_tests.llm_fixtures import smollm2_tokenizer, tiny_finetune_config, tiny_llama

SID = [300, 301, 302, 303, 310]  # stand-ins for ID tokens of the tiny model's vocabulary


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (2, 10))
    ids[0, 5:9] = torch.as_tensor([300, 310, 302, 303])
    ids[1, 6:8] = torch.as_tensor([301, 300])
    labels = ids.clone()
    labels[:, :5] = -100
    return ids, labels


def test_sid_vocab_maps_token_ids_to_columns_and_refuses_bad_ids():
    v = SidVocab.of([310, 300, 302, 300], 400)
    assert v.token_ids.tolist() == [300, 302, 310]
    assert v.column[[300, 302, 310, 5]].tolist() == [0, 1, 2, -1]
    with pytest.raises(ValueError, match=r"in \[0, 400\)"):
        SidVocab.of([400], 400)
    with pytest.raises(ValueError, match="non-empty"):
        SidVocab.of([], 400)


def test_completion_loss_normalises_id_targets_among_the_id_tokens_only():
    from animind_assets.lib.llm.distill import DistillBatch

    tok = smollm2_tokenizer()
    model = tiny_llama(tok).eval()
    ids, labels = _batch()
    V = model.get_output_embeddings().weight.shape[0]
    vocab = SidVocab.of(SID, V)
    with torch.no_grad():
        got, n, correct = completion_loss(model, ids, None, labels, sid_vocab=vocab)
        full, n_full, _ = completion_loss(model, ids, None, labels)
        logits = model(input_ids=ids).logits[:, :-1][labels[:, 1:] != -100].float()
    y = labels[:, 1:][labels[:, 1:] != -100]
    is_sid = torch.isin(y, torch.as_tensor(SID))
    assert int(is_sid.sum()) == 6 and n == n_full == len(y)
    sid_cols = torch.as_tensor(sorted(SID))
    lp_sid = torch.log_softmax(logits[is_sid][:, sid_cols], -1)
    col = {t: j for j, t in enumerate(sorted(SID))}
    nll_sid = -lp_sid[torch.arange(6), torch.as_tensor([col[int(t)] for t in y[is_sid]])]
    nll_other = torch.nn.functional.cross_entropy(logits[~is_sid], y[~is_sid], reduction="none")
    want = (nll_sid.sum() + nll_other.sum()) / n
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert float(got) < float(full)  # 5 columns instead of the whole vocabulary at the ID positions
    want_correct = int((lp_sid.argmax(-1) == torch.as_tensor([col[int(t)] for t in y[is_sid]])).sum()) \
        + int((logits[~is_sid].argmax(-1) == y[~is_sid]).sum())
    assert correct == want_correct

    # distillation: the soft targets (vocabulary ids as columns) land on the same ID-only log-softmax
    flat = is_sid.nonzero().squeeze(1)[[1, 4]]  # two ID positions of the flattened completion
    q = torch.as_tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    level = torch.as_tensor([300, 302, 310])
    with torch.no_grad():
        mixed, _, _ = completion_loss(model, ids, None, labels, distill=DistillBatch(flat, q, level), distill_weight=0.25,
                                    sid_vocab=vocab)
    rows = [int((is_sid.nonzero().squeeze(1) == f).nonzero()) for f in flat]
    soft = -(q * lp_sid[rows][:, [col[int(t)] for t in level]]).sum(1)
    want_mixed = (nll_sid.sum() + nll_other.sum() + 0.25 * (soft - nll_sid[rows]).sum()) / n
    assert float(mixed) == pytest.approx(float(want_mixed), rel=1e-5)
    with pytest.raises(ValueError, match="semantic-ID targets"):  # a distilled position that is not an ID target
        non_sid = (~is_sid).nonzero().squeeze(1)[:1]
        completion_loss(model, ids, None, labels, distill=DistillBatch(non_sid, q[:1], level), distill_weight=0.25,
                        sid_vocab=vocab)


def test_id_targets_leave_the_base_rows_of_the_head_untouched():
    tok = smollm2_tokenizer()
    model = tiny_llama(tok)
    ids, labels = _batch()
    keep = torch.isin(labels, torch.as_tensor(SID))
    labels = torch.where(keep, labels, torch.full_like(labels, -100))  # only ID targets
    vocab = SidVocab.of(SID, model.get_output_embeddings().weight.shape[0])
    loss, n, _ = completion_loss(model, ids, None, labels, sid_vocab=vocab)
    loss.backward()
    g = model.get_output_embeddings().weight.grad
    rows = g.abs().sum(1) > 0
    input_rows = set(ids.flatten().tolist())  # the tied input embedding's rows of the batch get gradient
    assert set(rows.nonzero().squeeze(1).tolist()) <= set(SID) | input_rows
    assert rows[torch.as_tensor(SID)].all()
    model.zero_grad()
    full, _, _ = completion_loss(model, ids, None, labels)
    full.backward()
    assert int((model.get_output_embeddings().weight.grad.abs().sum(1) > 0).sum()) > len(SID) + len(input_rows)


def test_step_log_probs_scores_id_tokens_as_the_model_was_trained(tiny_lm_folder):
    from animind_assets.lib.llm.infer import step_log_probs

    sm, res = tiny_lm_folder
    assert sm.sid_softmax and res.info["sid_softmax"] is True
    logits = torch.randn(3, sm.model.get_output_embeddings().weight.shape[0])
    lp = step_log_probs(sm, logits)
    idx = sm.sid_index()
    assert torch.allclose(lp[:, idx].exp().sum(1), torch.ones(3), atol=1e-5)  # a distribution over the ID tokens
    other = torch.ones(logits.shape[1], dtype=torch.bool)
    other[idx] = False
    assert torch.allclose(lp[:, other], torch.log_softmax(logits, -1)[:, other])
    sm.info["sid_softmax"] = False
    try:
        assert torch.allclose(step_log_probs(sm, logits), torch.log_softmax(logits, -1))
    finally:
        sm.info["sid_softmax"] = True


@pytest.fixture(scope="module")
def tiny_lm_folder(tmp_path_factory):
    """A tiny model fine-tuned with sid_softmax on the tiny Beauty split ("sequence" form), saved and loaded."""
    from animind_assets.lib.llm.finetune import run_finetune, save_model_folder
    from animind_assets.lib.llm.infer import load_sid_model
    from animind_assets.lib.llm.sequence_data import build_next_item_dataset, item_lookup

    tmp = tmp_path_factory.mktemp("sid_softmax")
    items, inter, sids = tiny_beauty()
    df = build_next_item_dataset(items, inter, sids, SEQ_CFG).frame
    lookup = item_lookup(items, sids)
    tok = smollm2_tokenizer()
    cfg = tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=2, english_ppl=False, linking_eval_items=0,
                               sid_softmax=True)
    res = run_finetune(df, lookup, cfg, tmp / "work", special_tokens=(), base=(tiny_llama(tok), tok))
    save_model_folder(res, lookup, tmp / "model")
    return load_sid_model(tmp / "model"), res


def test_a_sid_softmax_folder_ranks_with_the_cached_engine_and_refuses_generate(tiny_lm_folder):
    from animind_assets.lib.llm.infer import rank_items, trie_beam_search
    from animind_assets.lib.llm.model_folder import prompt_ids
    from animind_assets.lib.semantic_ids.tokens import sid_tokens_used

    sm, res = tiny_lm_folder
    assert all(torch.isfinite(torch.as_tensor(h["loss"])) for h in res.history if "loss" in h)
    assert res.metrics["phase2_val_loss"] > 0
    # the ID vocabulary of inference is the one training normalised over (saved in the folder)
    V = sm.model.get_output_embeddings().weight.shape[0]
    trained = SidVocab.of(sm.tokenizer.convert_tokens_to_ids(sid_tokens_used(sm.lookup["semantic_id"].to_list())), V)
    assert torch.equal(sm.sid_index(), trained.token_ids) and sm.info["sid_softmax_tokens"]
    prompt = "Recommend the next item."
    out = rank_items(sm, [prompt], k=5, num_beams=8)
    assert len(out.items[0]) == 5
    # the best path's beam score = the sum of its tokens' ID-only log-probabilities (a manual forward pass)
    text = sm.render(prompt)
    path, score = trie_beam_search(sm, text, sm.trie(), 8)[0]
    ids = prompt_ids(sm.tokenizer, text, sm.use_chat_template)
    with torch.no_grad():
        logits = sm.model(input_ids=torch.tensor([ids + list(path)])).logits[0, len(ids) - 1 : -1].float()
    idx = sm.sid_index()
    want = 0.0
    for row, t in zip(logits, path):
        lp = torch.log_softmax(row[idx], -1)[int((idx == t).nonzero())] if bool((idx == t).any()) else torch.log_softmax(row, -1)[t]
        want += float(lp)
    assert score == pytest.approx(want, abs=1e-3)
    sm.info["sid_softmax"] = False  # scored with the full vocabulary instead: another score for the same path
    try:
        full = dict(trie_beam_search(sm, text, sm.trie(), 8))
        assert path not in full or abs(full[path] - score) > 1e-3
    finally:
        sm.info["sid_softmax"] = True
    with pytest.raises(ValueError, match="engine 'hf'"):
        rank_items(sm, [prompt], k=5, num_beams=8, engine="hf")
    with pytest.raises(ValueError, match="fast_loss"):
        tiny_finetune_config(sid_softmax=True, fast_loss=False).validate()


def test_the_sid_softmax_knob_and_the_system_prompt_are_in_the_work_fingerprint(tmp_path):
    from animind_assets.lib.llm.finetune import run_finetune
    from animind_assets.lib.llm.sequence_data import SeqLlmDataConfig, build_next_item_dataset, item_lookup

    a = tiny_finetune_config().fingerprint_dict()
    b = tiny_finetune_config(sid_softmax=True).fingerprint_dict()
    assert a != b and b["sid_softmax"] is True
    # the resume kind of fault (../shared/cases: resumed silently with changed settings): two datasets that differ
    # only by their system message never share (resume) a work folder
    items, inter, sids = tiny_beauty()
    lookup = item_lookup(items, sids)
    tok = smollm2_tokenizer()
    cfg = tiny_finetune_config(phase1_max_steps=0, phase2_max_steps=1, english_ppl=False, linking_eval_items=0)
    works = []
    for system in ("You recommend.", "Recommender."):
        df = build_next_item_dataset(items, inter, sids, SeqLlmDataConfig(**{**CFG.__dict__, "system_prompt": system})).frame
        res = run_finetune(df, lookup, cfg, tmp_path, special_tokens=(), base=(tiny_llama(tok), tok))
        works.append(res.info["work_fingerprint"])
    assert works[0] != works[1]
