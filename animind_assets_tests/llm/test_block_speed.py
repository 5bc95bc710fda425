"""``lib/llm/block_speed.py``: the frozen blocks under ``torch.no_grad`` and the compiled blocks change the speed of a
top-``train_layers`` step, never its loss, its gradients or the model that comes out."""

from __future__ import annotations

import pytest
import torch

from animind_assets.lib.llm import block_speed as bs
from animind_assets.lib.llm import finetune as ft
from animind_assets.lib.llm.data import LlmDataConfig, build_llm_dataset, sid_lookup_frame
from animind_assets_tests.llm_fixtures import (
    make_catalog,
    make_interactions,
    make_semantic_ids,
    smollm2_tokenizer,
    tiny_finetune_config,
    tiny_llama,
)


def _top_block_model(layers: int = 3):
    """A tiny Llama as ``finetune._apply_method`` leaves it with ``train_layers=1``: only the top block and the
    embedding/head train, and the embedding output is detached."""
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, layers=layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.layers[-1].parameters():
        p.requires_grad_(True)
    model.get_input_embeddings().weight.requires_grad_(True)
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.detach())
    return model, hook


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), [p.grad.clone() for p in trained]


def test_frozen_blocks_no_grad_same_loss_and_gradients_and_restored_on_exit():
    model, _ = _top_block_model(layers=3)
    ids = torch.randint(0, 500, (2, 12))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    seen: list[bool] = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, _i: seen.append(torch.is_grad_enabled()))
    ctx = bs.FrozenBlocksNoGrad(model, detached_input=True)
    assert ctx.blocks == 2  # the two frozen blocks below the trained top block
    with ctx:
        loss, grads = _loss_and_grads(model, ids)
    assert seen == [False]  # the frozen block ran without autograd
    assert torch.equal(loss, ref_loss)
    assert len(grads) == len(ref_grads) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert "forward" not in vars(model.model.layers[0])  # the class's forward again
    seen.clear()
    _loss_and_grads(model, ids)
    assert seen == [True]


def test_frozen_blocks_no_grad_wraps_nothing_when_gradients_reach_the_blocks():
    """Without a detached embedding output (every block trains, LoRA) a gradient may pass through any block: none is
    wrapped. A frozen block *above* a trained one is never wrapped either."""
    model, hook = _top_block_model(layers=3)
    assert bs.FrozenBlocksNoGrad(model, detached_input=False).blocks == 0
    for p in model.model.layers[0].parameters():
        p.requires_grad_(True)  # the bottom block trains: nothing below it is frozen
    assert bs.FrozenBlocksNoGrad(model, detached_input=True).blocks == 0
    hook.remove()


def test_compiled_blocks_need_a_cxx_compiler_on_cpu(monkeypatch):
    model, _ = _top_block_model(layers=2)
    monkeypatch.setattr(bs, "cxx_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        with bs.CompiledBlocks(model, "cpu"):
            pass
    assert all(m._compiled_call_impl is None for m in model.model.layers)


@pytest.mark.skipif(bs.cxx_compiler() is None, reason="no C++ compiler for TorchInductor")
def test_compiled_blocks_same_loss_and_gradients_then_plain_again():
    model, _ = _top_block_model(layers=2)
    ids = torch.randint(0, 500, (2, 10))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    with bs.CompiledBlocks(model, "cpu") as ctx:
        assert ctx.blocks == 2 and all(m._compiled_call_impl is not None for m in model.model.layers)
        loss, grads = _loss_and_grads(model, ids)
        loss2, _ = _loss_and_grads(model, torch.randint(0, 500, (3, 7)))  # another shape: the same dynamic graph
    assert torch.isfinite(loss2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert all(m._compiled_call_impl is None for m in model.model.layers)


@pytest.mark.parametrize("no_grad", [True, False])
def test_fine_tune_runs_frozen_blocks_without_autograd_only_while_training(tmp_path, no_grad):
    """``frozen_blocks_no_grad`` (default on) with ``train_layers``: a training step runs the frozen blocks under
    ``torch.no_grad``; the validation loss and the returned model are plain again, and the run trains the same
    weights as with the knob off (``torch.equal``: the updates are the same)."""
    cat = make_catalog()
    sids = make_semantic_ids(cat)
    frame = build_llm_dataset(cat, make_interactions(), sids,
                              LlmDataConfig(n_examples=120, validation_user_frac=0.2, test_user_frac=0.2)).frame
    lookup = sid_lookup_frame(cat, sids)
    tok = smollm2_tokenizer()
    model = tiny_llama(tok, layers=3)
    grad_modes: list[bool] = []
    model.model.layers[0].mlp.register_forward_pre_hook(
        lambda m, _i: grad_modes.append(torch.is_grad_enabled()) if m.training else None)
    cfg = tiny_finetune_config(phase1_max_steps=2, phase2_max_steps=0, english_ppl=False, warm_start="mean",
                               linking_eval_items=0, train_layers=1, frozen_blocks_no_grad=no_grad)
    res = ft.run_finetune(frame, lookup, cfg, tmp_path / "run", base=(model, tok))
    assert grad_modes and set(grad_modes) == {not no_grad}
    assert "forward" not in vars(res.model.model.layers[0])
    top = res.model.model.layers[-1].mlp.down_proj.weight.detach().clone()
    if no_grad:  # the same run with autograd in the frozen blocks trains the same top block
        tok2 = smollm2_tokenizer()
        other = ft.run_finetune(frame, lookup, tiny_finetune_config(
            phase1_max_steps=2, phase2_max_steps=0, english_ppl=False, warm_start="mean", linking_eval_items=0,
            train_layers=1, frozen_blocks_no_grad=False), tmp_path / "other", base=(tiny_llama(tok2, layers=3), tok2))
        assert torch.equal(top, other.model.model.layers[-1].mlp.down_proj.weight)
