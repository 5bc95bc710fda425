"""``lib/llm/id_input_rows.py``: input-side rows of the new ID tokens, added at the first trained block of a
top-``train_layers`` fine-tune, trained, saved beside the model and attached again by ``infer.load_sid_model``."""

from __future__ import annotations

import json

import pytest
import torch

from animind_assets.lib.llm import finetune as ft
from animind_assets.lib.llm import id_input_rows as iir
from animind_assets.lib.llm.data import LlmDataConfig, build_llm_dataset, sid_lookup_frame
from animind_assets.lib.llm.finetune_config import FinetuneConfig
from animind_assets.lib.llm.infer import cache_keyword, load_sid_model
from animind_assets_tests import llm_fixtures as fx

N_BASE = 400  # the tiny tests' "base vocabulary": ids >= N_BASE play the new ID tokens


def _model(layers: int = 3):
    model = fx.tiny_llama(fx.smollm2_tokenizer(), layers=layers)
    model.eval()
    return model


def test_zero_rows_change_nothing_and_rows_move_only_id_positions():
    model = _model()
    ids = torch.tensor([[5, 17, N_BASE + 3, N_BASE + 9, 40, 41]])
    english = torch.tensor([[5, 17, 30, 31, 40, 41]])
    with torch.no_grad():
        ref, ref_en = model(ids).logits, model(english).logits
    att = iir.IdInputRows(model, N_BASE, layer=2)
    assert att.n_new == model.get_input_embeddings().weight.shape[0] - N_BASE and iir.attached(model) is att
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # zero at the start: the model is unchanged
        att.rows[3] += 1.0
        out, out_en = model(ids).logits, model(english).logits
    assert torch.equal(out_en, ref_en)  # no ID token in the input: nothing added
    assert torch.equal(out[:, :2], ref[:, :2])  # causal: positions before the first ID token are untouched
    assert not torch.allclose(out[:, 2:], ref[:, 2:])
    att.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_kv_cache_steps_match_the_full_forward():
    model = _model()
    att = iir.IdInputRows(model, N_BASE, layer=1)
    with torch.no_grad():
        att.rows.normal_(0, 0.5)
        x = torch.tensor([[7, N_BASE + 1, N_BASE + 2, 9, N_BASE + 4, N_BASE + 5, N_BASE + 6]])
        full = model(x).logits[:, -1]
        out = model(x[:, :5], use_cache=True)
        kw = cache_keyword(model)
        out = model(x[:, 5:6], **{kw: out.past_key_values}, use_cache=True)
        out = model(x[:, 6:7], **{kw: out.past_key_values}, use_cache=True)
    torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-4, atol=1e-5)


def test_rows_get_a_gradient_through_the_trained_blocks_only_while_registered():
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.layers[-1].parameters():
        p.requires_grad_(True)
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.detach())
    att = iir.IdInputRows(model, N_BASE, layer=2)
    x = torch.tensor([[5, N_BASE + 3, N_BASE + 7, 40]])
    with att.training():
        assert iir.PARAM_ATTR in dict(model.get_input_embeddings().named_parameters())
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
    assert iir.PARAM_ATTR not in dict(model.get_input_embeddings().named_parameters())
    g = att.rows.grad
    assert g is not None and g[3].abs().sum() > 0 and g[7].abs().sum() > 0
    assert g[[i for i in range(att.n_new) if i not in (3, 7)]].abs().sum() == 0  # only the rows of tokens in the input


def test_bad_arguments_raise():
    model = _model(layers=2)
    with pytest.raises(ValueError, match="layer must be in"):
        iir.IdInputRows(model, N_BASE, layer=2)
    with pytest.raises(ValueError, match="n_base"):
        iir.IdInputRows(model, 0, layer=1)
    with pytest.raises(ValueError, match="rows of shape"):
        iir.IdInputRows(model, N_BASE, layer=1, rows=torch.zeros(3, 64))
    with pytest.raises(ValueError, match="id_input_rows needs the top-train_layers"):
        FinetuneConfig(id_input_rows=True, train_layers=0).validate()
    assert "id_input_rows" not in FinetuneConfig().fingerprint_dict()  # the default keeps older fingerprints
    assert FinetuneConfig(id_input_rows=True, train_layers=1).fingerprint_dict()["id_input_rows"] is True


def test_fine_tune_trains_saves_and_reloads_the_rows(tmp_path):
    cat, tok = fx.make_catalog(), fx.smollm2_tokenizer()
    sids, n_base = fx.make_semantic_ids(cat), len(tok)
    data_cfg = LlmDataConfig(n_examples=120, validation_user_frac=0.2, test_user_frac=0.2)
    frame, lookup = build_llm_dataset(cat, fx.make_interactions(), sids, data_cfg).frame, sid_lookup_frame(cat, sids)
    cfg = fx.tiny_finetune_config(phase1_max_steps=2, phase2_max_steps=2, english_ppl=False, warm_start="mean",
                               linking_eval_items=0, train_layers=1, id_input_rows=True)
    res = ft.run_finetune(frame, lookup, cfg, tmp_path / "run", base=(fx.tiny_llama(tok, layers=3), tok))
    entry = res.info["id_input_rows"]
    assert entry["layer"] == 2 and entry["n_base"] == n_base and entry["rows"] == len(tok) - n_base
    att = iir.attached(res.model)
    assert att is not None and float(att.rows.detach().abs().sum()) > 0  # the rows trained
    assert res.metrics["id_input_rows_norm_mean"] > 0
    folder = tmp_path / "model"
    folder.mkdir()
    ft.save_model_folder(res, lookup, folder)
    assert (folder / iir.FILE).is_file()
    assert not any("animind" in k for k in res.model.state_dict())  # not in model.safetensors
    sm = load_sid_model(folder)
    loaded = iir.attached(sm.model)
    assert loaded is not None and torch.equal(loaded.rows.detach(), att.rows.detach())
    x = torch.tensor([[5, 17] + list(sm.sid_ids[int(lookup["anime_id"][0])]) + [40]])
    res.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(sm.model(x).logits, res.model(x).logits, rtol=1e-4, atol=1e-5)
    (folder / iir.FILE).unlink()
    with pytest.raises(FileNotFoundError, match="id_input_rows.safetensors"):
        load_sid_model(folder)
    info = json.loads((folder / "animind_llm.json").read_text())
    assert info["config"]["id_input_rows"] is True
    # an incomplete or edited animind_llm.json never loads the model without its rows silently
    info_path = folder / "animind_llm.json"
    info_path.write_text(json.dumps({k: v for k, v in info.items() if k != iir.INFO_KEY}))
    with pytest.raises(ValueError, match="animind_llm.json: config.id_input_rows is true but there is no"):
        load_sid_model(folder)
    att.save(folder)  # the file again (unlinked above): an entry that does not fit the loaded model
    info_path.write_text(json.dumps({**info, iir.INFO_KEY: {**entry, "layer": 7}}))
    with pytest.raises(ValueError, match=r"animind_llm.json: id_input_rows: layer must be in \[0, 3\)"):
        load_sid_model(folder)
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="file must be a file name inside the folder"):
        iir.saved_entry(folder, {**info, iir.INFO_KEY: {**entry, "file": "../other/rows.safetensors"}})
    with pytest.raises(ValueError, match="must be an object"):
        iir.saved_entry(folder, {**info, iir.INFO_KEY: True})
    with pytest.raises(ValueError, match="lacks integer field.* rows, dim"):
        iir.saved_entry(folder, {**info, iir.INFO_KEY: {"layer": 2, "n_base": n_base}})
    assert iir.saved_entry(folder, {"config": {}}) is None  # a folder from before the field: no rows
    (folder / iir.FILE).write_bytes(b"\x00\x01")  # corrupt
    with pytest.raises(ValueError, match=r"id_input_rows\.safetensors: not a readable safetensors file"):
        load_sid_model(folder)
    from safetensors.torch import save_file

    save_file({"other": torch.zeros(2, 2)}, str(folder / iir.FILE))
    with pytest.raises(ValueError, match="no tensor 'rows'"):
        iir.load_rows(folder, entry)


def test_rows_need_frozen_blocks_even_with_the_base_rows_frozen(tmp_path):
    """Every block trained: refused although freezing the base vocabulary's rows adds hooks of its own."""
    cat, tok = fx.make_catalog(), fx.smollm2_tokenizer()
    sids = fx.make_semantic_ids(cat)
    data_cfg = LlmDataConfig(n_examples=60, validation_user_frac=0.2, test_user_frac=0.2)
    frame, lookup = build_llm_dataset(cat, fx.make_interactions(), sids, data_cfg).frame, sid_lookup_frame(cat, sids)
    cfg = fx.tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=1, english_ppl=False, warm_start="mean",
                                  linking_eval_items=0, train_layers=3, id_input_rows=True,
                                  train_base_token_rows=False)
    with pytest.raises(ValueError, match=r"train_layers \(3\) must be below the model's block count \(3\)"):
        ft.run_finetune(frame, lookup, cfg, tmp_path / "run", base=(fx.tiny_llama(tok, layers=3), tok))
    with pytest.raises(ValueError, match="below keep_layers"):
        FinetuneConfig(id_input_rows=True, train_layers=4, keep_layers=4).validate()
