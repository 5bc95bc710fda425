"""Beauty retrieval library on tiny synthetic splits: the leave-one-out evaluation (hand-computed
ranks, ties, masking, bootstrap), no leakage of validation/test items into training, SASRec (CE and
BCE) and RPG shapes / loss decreases / exact scoring, product quantization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from animind_assets.lib.retrieval.evaluation import (
    heldout_nll,
    SequenceSplit,
    bootstrap_ci,
    evaluate_rankings,
    evaluate_scorer,
    metrics_from_ranks,
    popularity_counts,
    popularity_scorer,
    subset_note,
    target_ranks,
)
from animind_assets.lib.retrieval.pq import PQConfig, product_quantize
from animind_assets.lib.retrieval.rpg import (
    RPG,
    RPGConfig,
    brute_force_scores,
    load_rpg,
    marginal_code_log_probs,
    marginal_product_scorer,
    save_rpg,
    train_rpg,
)
from animind_assets.lib.retrieval.sasrec import SASRec, SASRecConfig, load_sasrec, save_sasrec, train_sasrec
from animind_assets.lib.retrieval.seqtrain import SeqTrainConfig, lr_factor, pad_left, train_sequence_model, training_pairs


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tiny_split(n_users: int = 120, n_items: int = 40, seed: int = 0) -> SequenceSplit:
    """Users walk a cycle of items (item i is followed by i+1), so next-item models can learn it."""
    rng = np.random.default_rng(seed)
    seqs = {}
    for u in range(n_users):
        start = int(rng.integers(0, n_items))
        length = int(rng.integers(4, 10))
        seqs[u * 3 + 7] = [(start + t) % n_items for t in range(length)]
    return SequenceSplit.from_sequences(seqs, n_items=n_items)


def train_cfg(**kw) -> SeqTrainConfig:
    base = dict(max_len=8, batch_size=32, lr=5e-3, epochs=3, patience=0, num_threads=1, device="cpu", length_buckets=0)
    base.update(kw)
    return SeqTrainConfig(**base)


# ------------------------------------------------------------------------------------------ split
def test_split_holds_out_last_two_items_and_skips_short_users():
    split = SequenceSplit.from_sequences({5: [1, 2, 3, 4], 2: [7, 8, 9], 9: [1, 2]}, n_items=10)
    assert split.users.tolist() == [2, 5] and split.skipped_users == 1
    assert [t.tolist() for t in split.train] == [[7], [1, 2]]
    assert split.valid_targets.tolist() == [8, 3] and split.test_targets.tolist() == [9, 4]
    assert [h.tolist() for h in split.histories("valid")] == [[7], [1, 2]]
    assert [h.tolist() for h in split.histories("test")] == [[7, 8], [1, 2, 3]]
    with pytest.raises(ValueError, match="item id 12 >= n_items 10"):
        SequenceSplit.from_sequences({0: [1, 2, 12]}, n_items=10)


def test_subset_of_test_users_is_seeded_and_says_when_it_means_all():
    split = tiny_split(n_users=50)
    n = len(split)
    a, b = split.subset(10, seed=3), split.subset(10, seed=3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10 and a.tolist() == sorted(a.tolist())
    assert split.subset(10, seed=4).tolist() != a.tolist()
    assert split.subset(0).tolist() == split.subset(n + 5).tolist() == list(range(n))
    assert subset_note(0, n) == f"test users: all {n}"
    assert subset_note(10, n) == f"test users: a seeded subset of 10 of {n}"
    assert subset_note(n + 5, n).startswith(f"test users: all {n} (--test-users {n + 5} asks for")


def test_no_leakage_of_validation_or_test_items_into_training():
    split = tiny_split()
    inputs, targets = training_pairs(split, max_len=50)
    seqs = {}
    for u, t, v, te in zip(split.users, split.train, split.valid_targets, split.test_targets):
        seqs[int(u)] = (t.tolist(), int(v), int(te))
    # every training pair comes from seq[:-2] only: inputs+last target == the training sequence
    for inp, tgt, (train, _v, _te) in zip(inputs, targets, seqs.values()):
        assert inp.tolist() + [tgt.tolist()[-1]] == train
        assert tgt.tolist() == train[1:]
    # and the split never puts the held-out positions into train
    for u, t, v, te in zip(split.users, split.train, split.valid_targets, split.test_targets):
        assert len(t) >= 1
    lengths = sum(len(t) for t in split.train)
    assert lengths == sum(len(x) + 1 for x in inputs)


# ------------------------------------------------------------------------------------------ metrics
def test_target_ranks_ties_by_ascending_item_id():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9, 0.5]])
    assert target_ranks(scores, torch.tensor([3])).item() == 0
    assert target_ranks(scores, torch.tensor([1])).item() == 1  # tie with 2 and 4: smallest id first
    assert target_ranks(scores, torch.tensor([2])).item() == 2
    assert target_ranks(scores, torch.tensor([4])).item() == 3
    assert target_ranks(scores, torch.tensor([0])).item() == 4
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))


def test_metrics_on_a_hand_example():
    ranks = np.array([0, 1, 4, 5, 9, 10, 100])
    m = metrics_from_ranks(ranks, ks=(5, 10))
    assert m["recall@5"] == pytest.approx(3 / 7)
    assert m["recall@10"] == pytest.approx(5 / 7)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 7)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(7) + 1 / math.log2(11)) / 7)
    ci = bootstrap_ci(ranks, ks=(10,), n_boot=200, seed=1)
    lo, hi = ci["recall@10"]
    assert lo <= m["recall@10"] <= hi and 0 <= lo < hi <= 1
    assert bootstrap_ci(ranks, ks=(10,), n_boot=200, seed=1) == ci  # seeded


def test_evaluate_scorer_masking_option():
    split = SequenceSplit.from_sequences({0: [0, 1, 2, 3], 1: [4, 5, 3, 2]}, n_items=6)
    # test histories: [0, 1, 2] -> 3 and [4, 5, 3] -> 2. Scores favour seen items.
    fixed = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])

    def score(histories):
        return fixed.expand(len(histories), -1)

    res = evaluate_scorer(score, split, stage="test", n_boot=0)
    # unmasked: target 3 has rank 3, target 2 has rank 2
    assert res.ranks["unmasked"].tolist() == [3, 2]
    # masked: user 0 loses items 0, 1, 2 -> target 3 first; user 1 loses 3, 4, 5 -> 2 after 0, 1
    assert res.ranks["masked"].tolist() == [0, 2]
    assert res.metrics["masked"]["recall@5"] == 1.0
    assert res.metrics["masked"]["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 2)
    assert res.extra["targets_in_history"] == 0
    with pytest.raises(ValueError, match="shape"):
        evaluate_scorer(lambda h: torch.zeros(len(h), 5), split, n_boot=0)


def test_evaluate_rankings_matches_scorer_and_masks_history():
    split = SequenceSplit.from_sequences({0: [0, 1, 2, 3], 1: [4, 5, 3, 2]}, n_items=6)
    res = evaluate_rankings({"unmasked": [[0, 1, 2, 3], [0, 1, 2]], "masked": [[0, 3, 1], [1, 5, 2]]}, split, n_boot=0)
    assert res.ranks["unmasked"].tolist() == [3, 2]
    assert res.ranks["masked"].tolist() == [0, 1]  # 0 (seen) removed for user 0; 5 (seen) removed for user 1
    res = evaluate_rankings({"unmasked": [[5], [5]]}, split, n_boot=0)
    assert res.ranks["unmasked"].tolist() == [10, 10]


def test_popularity_counts_use_only_what_precedes_the_stage():
    split = SequenceSplit.from_sequences({0: [0, 1, 2, 3], 1: [1, 4, 5]}, n_items=6)
    assert popularity_counts(split, "valid").tolist() == [1, 2, 0, 0, 0, 0]
    assert popularity_counts(split, "test").tolist() == [1, 2, 1, 0, 1, 0]
    res = evaluate_scorer(popularity_scorer(split, "test"), split, n_boot=0)
    assert res.ranks["unmasked"].tolist() == [4, 5]  # 4 items count more; item 5 also ties behind item 3


# ------------------------------------------------------------------------------------------ models
def test_lr_schedule_warms_up_then_stays_or_decays_to_zero():
    const = lr_factor(SeqTrainConfig(warmup_steps=10), 110)
    cos = lr_factor(SeqTrainConfig(warmup_steps=10, lr_schedule="cosine"), 110)
    assert const(0) == cos(0) == pytest.approx(0.1) and const(9) == cos(9) == 1.0
    assert const(60) == const(109) == 1.0
    assert cos(10) == 1.0 and cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    assert all(cos(s) >= cos(s + 1) for s in range(10, 120))
    with pytest.raises(ValueError, match="lr_schedule"):
        SeqTrainConfig(lr_schedule="linear").validate()


def test_pad_left_keeps_the_most_recent_items():
    t = pad_left([np.array([1, 2, 3, 4]), np.array([7])], max_len=3)
    assert t.tolist() == [[3, 4, 5], [0, 0, 8]]


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_sasrec_shapes_and_loss_decreases(loss):
    split = tiny_split()
    cfg = SASRecConfig(hidden=16, blocks=2, heads=1, dropout=0.0, loss=loss, train=train_cfg(epochs=1))
    torch.manual_seed(0)
    model = SASRec(split.n_items, cfg)
    inputs, targets = training_pairs(split, 8)
    inp, tgt = pad_left(inputs[:32], 8), pad_left(targets[:32], 8)
    assert model.hidden_states(inp).shape == (32, inp.shape[1], 16)
    assert model.score(inp).shape == (32, split.n_items)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    first = float(model.loss(inp, tgt).detach())
    for _ in range(30):
        opt.zero_grad()
        model.loss(inp, tgt).backward()
        opt.step()
    torch.manual_seed(1)
    assert float(model.loss(inp, tgt).detach()) < 0.8 * first


def test_sasrec_training_learns_the_cycle_and_round_trips(tmp_path):
    split = tiny_split()
    cfg = SASRecConfig(hidden=32, blocks=1, heads=1, dropout=0.0, train=train_cfg(epochs=25, lr=1e-2))
    from animind_assets.lib.retrieval.sasrec import train_sasrec
    from animind_assets.lib.retrieval.seqtrain import make_scorer

    res = train_sasrec(split, cfg)
    assert res.history and res.best["val_ndcg@10"] == max(h["val_ndcg@10"] for h in res.history)
    ev = evaluate_scorer(make_scorer(res.model, 8), split, "test", n_boot=0)
    pop = evaluate_scorer(popularity_scorer(split), split, "test", n_boot=0)
    assert ev.metrics["masked"]["recall@5"] > 0.5 > pop.metrics["masked"]["recall@5"]
    save_sasrec(res.model, str(tmp_path / "m"))
    loaded, _ = load_sasrec(str(tmp_path / "m"))
    inp = pad_left(split.histories("test")[:5], 8)
    assert torch.allclose(loaded.score(inp), res.model.score(inp), atol=1e-5)


def test_heldout_nll_is_the_cross_entropy_of_the_held_out_item_under_the_full_softmax():
    split = tiny_split()
    rows = np.array([0, 3, 5, 8])
    items = torch.arange(split.n_items, dtype=torch.float32)

    def scorer(histories):  # any fixed function of the history
        return torch.stack([3.0 * torch.sin(0.37 * float(h.sum()) + 1.3 * items) for h in histories])

    hist = split.histories("valid")
    want = float(torch.nn.functional.cross_entropy(scorer([hist[r] for r in rows]),
                                                   torch.as_tensor(split.targets("valid")[rows])))
    assert heldout_nll(scorer, split, "valid", rows, batch_size=3) == pytest.approx(want, rel=1e-6)
    # seen items are not masked: a history item's score counts in the normaliser
    assert heldout_nll(lambda h: np.zeros((len(h), split.n_items)), split, "test", rows) == pytest.approx(math.log(split.n_items))
    with pytest.raises(ValueError, match="no user rows"):
        heldout_nll(scorer, split, "valid", np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        heldout_nll(lambda h: torch.full((len(h), split.n_items), float("nan")), split, "valid", rows)


def test_early_stopping_on_validation_nll_keeps_the_epoch_of_the_lowest_nll():
    split = tiny_split()
    cfg = SASRecConfig(hidden=32, blocks=1, heads=1, dropout=0.0,
                       train=train_cfg(epochs=12, lr=1e-2, patience=3, early_stop_metric="nll"))
    logs = []
    res = train_sasrec(split, cfg, log=logs.append)
    nll = [h["val_nll"] for h in res.history]
    assert all(np.isfinite(nll)) and res.best["val_nll"] == min(nll)
    assert res.history[-1]["best_val_nll"] == min(nll)
    # the restored weights are the best epoch's: their NLL on the same users is the recorded minimum
    from animind_assets.lib.retrieval.seqtrain import make_scorer

    rows = split.subset(0, seed=cfg.train.seed + 1)
    assert heldout_nll(make_scorer(res.model, 8), split, "valid", rows) == pytest.approx(res.best["val_nll"], rel=1e-5)
    if res.stop_reason.startswith("early stopping"):
        assert "no val NLL gain in 3" in res.stop_reason
        assert len(nll) - 1 - int(np.argmin(nll)) == 3
    assert any("NLL" in line for line in logs)
    # the default keeps NDCG@10 and computes no NLL
    plain = train_sasrec(split, SASRecConfig(hidden=32, blocks=1, heads=1, dropout=0.0, train=train_cfg(epochs=2)))
    assert "val_nll" not in plain.history[0] and "best_val_ndcg@10" in plain.history[0]
    with pytest.raises(ValueError, match="early_stop_metric"):
        train_cfg(early_stop_metric="recall").validate()


def tiny_codes(n_items: int, m: int = 4, k: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=(n_items, m))


def test_rpg_exact_scoring_equals_brute_force_sum_of_code_log_probs():
    split = tiny_split()
    codes = tiny_codes(split.n_items)
    model = RPG(codes, 8, RPGConfig(hidden=16, heads=2, d_ff=32, train=train_cfg()))
    torch.nn.init.normal_(model.head_w, std=0.1)  # non-trivial heads
    model.eval()
    inp = pad_left(split.histories("test")[:9], 8)
    fast = model.score(inp)
    assert fast.shape == (9, split.n_items)
    slow = brute_force_scores(model, inp)
    assert torch.allclose(fast, slow, atol=1e-4)
    # and by hand for one user / item
    logp = model.code_log_probs(inp[:1])[0]
    item = 17
    assert float(fast[0, item]) == pytest.approx(float(sum(logp[j, codes[item, j]] for j in range(4)).detach()), abs=1e-4)
    # items sharing all codes get identical scores
    codes2 = codes.copy()
    codes2[5] = codes2[6]
    m2 = RPG(codes2, 8, RPGConfig(hidden=16, heads=2, d_ff=32, train=train_cfg())).eval()
    s2 = m2.score(inp)
    assert torch.equal(s2[:, 5], s2[:, 6])


def test_rpg_dot_logits_score_exactly_train_and_round_trip(tmp_path):
    """logits="dot": code logits are the plain dot products z_j . E_j[c] (no normalisation, no temperature),
    exact scoring still equals the brute-force sum of code log-probabilities, the item-level loss equals the
    full softmax over those scores / m, training lowers the loss, the option survives save/load, and an
    unknown option is refused."""
    split = tiny_split()
    codes = tiny_codes(split.n_items)
    cfg = RPGConfig(hidden=16, heads=2, d_ff=32, emb_dropout=0.0, attn_dropout=0.0, logits="dot", code_loss_weight=0.0,
                    item_loss_weight=1.0, item_negatives=0, train=train_cfg(epochs=8, lr=1e-2))
    model = RPG(codes, 8, cfg)
    torch.nn.init.normal_(model.head_w, std=0.1)
    model.eval()
    inp = pad_left(split.histories("test")[:9], 8)
    h = model.hidden_states(inp)[:, -1]
    z = h.unsqueeze(1) + torch.nn.functional.silu(torch.einsum("bd,mde->bme", h, model.head_w) + model.head_b)
    by_hand = torch.einsum("bmd,mkd->bmk", z, model.code_emb.weight.view(4, 8, -1))
    assert torch.allclose(model.code_logits(h), by_hand, atol=1e-5)
    assert torch.allclose(model.score(inp), brute_force_scores(model, inp), atol=1e-4)
    tgt = torch.as_tensor(split.test_targets[:9], dtype=torch.long)
    loss = model.item_loss(model.code_logits(h), tgt)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(brute_force_scores(model, inp) / model.m, tgt)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    res = train_rpg(split, codes, 8, cfg)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    save_rpg(res.model, str(tmp_path / "m"))
    loaded, _ = load_rpg(str(tmp_path / "m"))
    assert loaded.cfg.logits == "dot" and torch.allclose(loaded.score(inp), res.model.score(inp), atol=1e-5)
    with pytest.raises(ValueError, match="logits"):
        RPGConfig(logits="l2").validate()


def test_rpg_sqrt_pooling_sums_code_embeddings_over_sqrt_m():
    """pooling="sqrt": an item's input representation is the sum of its m code embeddings / sqrt(m)
    (mean x sqrt(m)), padding stays 0; an unknown pooling is refused."""
    split = tiny_split()
    codes = tiny_codes(split.n_items)
    mean = RPG(codes, 8, RPGConfig(hidden=16, heads=2, d_ff=32, train=train_cfg()))
    sqrt = RPG(codes, 8, RPGConfig(hidden=16, heads=2, d_ff=32, pooling="sqrt", train=train_cfg()))
    sqrt.load_state_dict(mean.state_dict())
    tokens = torch.tensor([[0, 3, 7]])
    by_hand = sum(sqrt.code_emb.weight[j * 8 + int(codes[6, j])] for j in range(4)) / 2.0  # item 6 = token 7, m = 4
    assert torch.allclose(sqrt.item_repr(tokens)[0, 2], by_hand, atol=1e-6)
    assert torch.allclose(sqrt.item_repr(tokens), mean.item_repr(tokens) * 2.0, atol=1e-6)
    assert float(sqrt.item_repr(tokens)[0, 0].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="pooling"):
        RPGConfig(pooling="max").validate()


def test_rpg_loss_decreases_and_round_trips(tmp_path):
    split = tiny_split()
    codes = tiny_codes(split.n_items)
    cfg = RPGConfig(hidden=16, heads=2, d_ff=32, emb_dropout=0.0, attn_dropout=0.0, temperature=0.1, train=train_cfg(epochs=8, lr=1e-2))
    res = train_rpg(split, codes, 8, cfg)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0]
    save_rpg(res.model, str(tmp_path / "rpg"))
    loaded, _ = load_rpg(str(tmp_path / "rpg"))
    inp = pad_left(split.histories("test")[:4], 8)
    assert torch.allclose(loaded.score(inp), res.model.score(inp), atol=1e-5)
    with pytest.raises(ValueError, match="codes has"):
        train_rpg(split, codes[:-1], 8, cfg)
    with pytest.raises(ValueError, match="codes must be in"):
        RPG(codes, 4, cfg)


def test_rpg_item_level_loss_scores_what_the_ranking_uses_and_trains(monkeypatch):
    """The optional item-level loss: the target's score is the mean of its codes' log-probabilities (the
    test ranking / m), a sampled negative equal to the target is masked, and training with it learns."""
    split = tiny_split()
    codes = tiny_codes(split.n_items)
    cfg = RPGConfig(hidden=16, heads=2, d_ff=32, emb_dropout=0.0, attn_dropout=0.0, temperature=0.1,
                    item_loss_weight=1.0, item_negatives=split.n_items * 4, train=train_cfg(epochs=8, lr=1e-2))
    model = RPG(codes, 8, cfg).eval()
    inp = pad_left(split.histories("test")[:4], 8)
    tgt = torch.as_tensor(split.test_targets[:4], dtype=torch.long)
    logits = model.code_logits(model.hidden_states(inp)[:, -1])
    full = model.score(inp)
    # negatives = every item once: the target's copy among them is masked, so the loss is exactly the full
    # item softmax over the ranking's scores / m
    with monkeypatch.context() as mp:
        mp.setattr(torch, "randint", lambda low, high, size, **kw: torch.arange(low, high))
        loss = model.item_loss(logits, tgt)
    ref = torch.nn.functional.cross_entropy(full / model.m, tgt)
    assert float(loss) == pytest.approx(float(ref), rel=1e-4)
    _assert_rpg_trains(split, codes, cfg)
    with pytest.raises(ValueError, match="item_loss_weight"):
        RPGConfig(item_loss_weight=-1.0).validate()


def _assert_rpg_trains(split, codes, cfg) -> None:
    """Training with ``cfg`` on the tiny split lowers the training loss (first -> last epoch)."""
    losses = [h["train_loss"] for h in train_rpg(split, codes, 8, cfg).history]
    assert losses[-1] < losses[0]


def test_rpg_exact_item_level_loss_is_the_full_softmax_over_ranking_scores_with_gradients():
    """item_negatives=0: the item-level loss is the exact softmax cross-entropy over every item's mean code
    log-probability (= brute-force ranking scores / m), gradients reach the model, and
    item_loss_positions limits it to a random subset of a batch's target positions."""
    split = tiny_split()
    codes = tiny_codes(split.n_items)
    cfg = RPGConfig(hidden=16, heads=2, d_ff=32, emb_dropout=0.0, attn_dropout=0.0, temperature=0.1,
                    item_loss_weight=1.0, item_negatives=0, train=train_cfg(epochs=8, lr=1e-2))
    torch.manual_seed(0)
    model = RPG(codes, 8, cfg).eval()
    torch.nn.init.normal_(model.head_w, std=0.1)
    inp = pad_left(split.histories("test")[:4], 8)
    tgt = torch.as_tensor(split.test_targets[:4], dtype=torch.long)
    logits = model.code_logits(model.hidden_states(inp)[:, -1])
    loss = model.item_loss(logits, tgt)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(brute_force_scores(model, inp) / model.m, tgt)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    loss.backward()
    assert model.head_w.grad is not None and float(model.head_w.grad.abs().sum()) > 0
    # a subset of positions: the loss only sees item_loss_positions targets per batch
    seen = []
    orig = RPG.item_loss
    sub = RPG(codes, 8, RPGConfig(**{**cfg.to_dict(), "item_loss_positions": 3}))
    sub.item_loss = lambda lg, t, teacher=None: seen.append(len(t)) or orig(sub, lg, t, teacher)
    batch = pad_left(split.histories("test")[:6], 8)
    targets = torch.cat([batch[:, 1:], torch.as_tensor(split.test_targets[:6] + 1).unsqueeze(1)], dim=1) * (batch > 0)
    sub.loss(batch, targets)
    assert seen == [3]
    _assert_rpg_trains(split, codes, cfg)
    with pytest.raises(ValueError, match="item_loss_positions"):
        RPGConfig(item_loss_positions=-1).validate()


def test_item_code_sums_forward_and_backward_equal_a_dense_product():
    """The blocked sparse operator behind the exact item-level loss and the scoring: values (M, m*K) ->
    per-item code sums (M, N), and its custom backward, equal the dense (M, m*K) x (m*K, N) product
    and its autograd gradient, across several 64-row blocks."""
    from animind_assets.lib.retrieval.rpg import item_code_matrix, item_code_sums
    rng = np.random.default_rng(3)
    codes = torch.as_tensor(rng.integers(0, 5, (37, 4)))
    a = item_code_matrix(codes, 5)
    a_t = a.to_sparse_coo().t().coalesce().to_sparse_csr()
    dense = torch.zeros(37, 20)
    for i in range(37):
        for j in range(4):
            dense[i, j * 5 + int(codes[i, j])] = 1.0
    x = torch.randn(150, 20, requires_grad=True)  # 150 rows = blocks of 64, 64, 22
    w = torch.randn(150, 37)
    out = item_code_sums(x, a, a_t)
    (out * w).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    ref = x @ dense.T
    (ref * w).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(grad, x.grad, atol=1e-5)


def test_rpg_item_level_loss_alone_trains_and_needs_some_loss():
    """code_loss_weight=0: RPG's code cross-entropy is off, the exact item-level loss alone trains the
    model; both weights 0 is refused."""
    split = tiny_split()
    codes = tiny_codes(split.n_items)
    cfg = RPGConfig(hidden=16, heads=2, d_ff=32, emb_dropout=0.0, attn_dropout=0.0, temperature=0.1,
                    code_loss_weight=0.0, item_loss_weight=1.0, item_negatives=0, train=train_cfg(epochs=8, lr=1e-2))
    model = RPG(codes, 8, cfg).eval()
    batch = pad_left(split.histories("test")[:6], 8)
    targets = torch.cat([batch[:, 1:], torch.as_tensor(split.test_targets[:6] + 1).unsqueeze(1)], dim=1) * (batch > 0)
    valid = targets > 0
    logits = model.code_logits(model.hidden_states(batch)[valid])
    assert float(model.loss(batch, targets)) == pytest.approx(float(model.item_loss(logits, targets[valid] - 1)), rel=1e-5)
    _assert_rpg_trains(split, codes, cfg)
    with pytest.raises(ValueError, match="nothing to train"):
        RPGConfig(code_loss_weight=0.0).validate()


def test_rpg_distillation_mixes_the_teacher_softmax_into_the_item_target_and_trains():
    """distill_weight = a: the exact item-level loss is the cross-entropy of the ranking scores against
    (1 - a) one-hot + a softmax(teacher / T) (a hand-computed KL form), a = 0 gives the plain loss, training
    with a SASRec teacher lowers the loss and leaves no teacher in the saved state; bad settings are refused."""
    split = tiny_split()
    codes = tiny_codes(split.n_items)
    sas = train_sasrec(split, SASRecConfig(hidden=16, heads=1, dropout=0.0, train=train_cfg(epochs=3, lr=1e-2))).model.eval()
    cfg = RPGConfig(hidden=16, heads=2, d_ff=32, emb_dropout=0.0, attn_dropout=0.0, temperature=0.1, code_loss_weight=0.0,
                    item_loss_weight=1.0, item_negatives=0, distill_weight=0.3, distill_temperature=2.0,
                    train=train_cfg(epochs=6, lr=1e-2))
    model = RPG(codes, 8, cfg).eval()
    torch.nn.init.normal_(model.head_w, std=0.1)
    batch = pad_left(split.histories("test")[:6], 8)
    targets = torch.cat([batch[:, 1:], torch.as_tensor(split.test_targets[:6] + 1).unsqueeze(1)], dim=1) * (batch > 0)
    valid = targets > 0
    with pytest.raises(ValueError, match="needs a teacher"):
        model.loss(batch, targets)
    model.set_teacher(lambda inp, v: sas.position_logits(inp, v))
    t_logits = sas.position_logits(batch, valid)
    assert t_logits.shape == (int(valid.sum()), split.n_items)
    scores = brute_force_scores_at(model, batch, valid) / model.m
    tgt = targets[valid] - 1
    mix = 0.3 * torch.softmax(t_logits / 2.0, 1)
    mix[torch.arange(len(tgt)), tgt] += 0.7
    want = float(-(mix * torch.log_softmax(scores, 1)).sum(1).mean())
    assert float(model.loss(batch, targets)) == pytest.approx(want, rel=1e-4)
    trained = train_rpg(split, codes, 8, cfg, teacher=sas)
    losses = [h["train_loss"] for h in trained.history]
    assert losses[-1] < losses[0]
    assert trained.model._teacher is None and not any(k.startswith("teacher") for k in trained.model.state_dict())
    with pytest.raises(ValueError, match="needs a teacher"):
        train_rpg(split, codes, 8, cfg)
    with pytest.raises(ValueError, match="exact item-level loss"):
        RPGConfig(item_loss_weight=1.0, item_negatives=16, distill_weight=0.5).validate()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RPGConfig(item_loss_weight=1.0, item_negatives=0, distill_weight=1.5).validate()


def brute_force_scores_at(model, batch, valid):
    """Summed code log-probabilities of every item at every valid position (loop over codebooks)."""
    logp = torch.log_softmax(model.code_logits(model.hidden_states(batch)[valid]), -1)  # (M, m, K)
    out = torch.zeros(logp.shape[0], model.n_items)
    for j in range(model.m):
        out += logp[:, j, model.codes[:, j]]
    return out


def test_marginal_code_log_probs_and_the_product_of_marginals_ranking_match_loops():
    """Per-codebook marginals of an item softmax, and RPG-style ranking by their summed logs, equal a
    brute-force loop over items; a code no item uses gets ~log(1e-30)."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 5, size=(9, 3))
    codes[:, 2] = np.minimum(codes[:, 2], 3)  # code 4 of codebook 2 unused
    scores = torch.as_tensor(rng.normal(size=(2, 9)), dtype=torch.float32)
    logp = marginal_code_log_probs(scores, codes, 5)
    p = torch.softmax(scores, 1)
    for b in range(2):
        for j in range(3):
            for c in range(5):
                want = float(p[b, codes[:, j] == c].sum())
                assert math.exp(float(logp[b, j, c])) == pytest.approx(want, abs=1e-6)
    assert float(logp[0, 2, 4]) < -60
    ranked = marginal_product_scorer(lambda h: scores, codes, 5)([None, None])
    brute = torch.stack([sum(logp[:, j, codes[i, j]] for j in range(3)) for i in range(9)], 1)
    assert torch.allclose(ranked, brute, atol=1e-5)
    with pytest.raises(ValueError, match="item_scores"):
        marginal_code_log_probs(scores[:, :4], codes, 5)

def _models_for_padding_check():
    split = tiny_split()
    torch.manual_seed(0)
    sas = SASRec(split.n_items, SASRecConfig(hidden=16, blocks=2, heads=2, dropout=0.0, train=train_cfg()))
    rpg = RPG(tiny_codes(split.n_items), 8, RPGConfig(hidden=16, heads=2, d_ff=32, train=train_cfg()))
    torch.nn.init.normal_(rpg.head_w, std=0.1)
    for model in (sas, rpg):  # non-zero LayerNorm biases: padding keys would get a non-trivial key/value
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.5)
    return split, sas.eval(), rpg.eval()


def test_scores_do_not_depend_on_the_padding_of_the_batch():
    """A user's scores are the same alone and in a batch padded for a longer history (padding keys are
    masked). Regression: evaluation batches padded short histories to 50 positions, so SASRec's and
    RPG's test scores depended on the longest history in the batch and differed from training."""
    split, sas, rpg = _models_for_padding_check()
    short = [np.array([3, 4]), np.array([9])]
    long = np.arange(8)
    for model in (sas, rpg):
        alone = torch.cat([model.score(pad_left([h], 8)) for h in short])
        batched = model.score(pad_left(short + [long], 8))[:2]
        assert torch.allclose(alone, batched, atol=1e-5), type(model).__name__
        assert torch.isfinite(batched).all()


def test_rpg_learns_a_memorizable_sequence_from_its_codes():
    """On the cycle split (item i is always followed by i+1) RPG must predict the codes of the next
    item: the exact item score ranks the test target in the top 5 for most users."""
    from animind_assets.lib.retrieval.seqtrain import make_scorer

    split = tiny_split()
    codes = tiny_codes(split.n_items)
    assert len({tuple(c) for c in codes}) == split.n_items  # every item identifiable from its codes
    cfg = RPGConfig(hidden=32, heads=2, d_ff=64, emb_dropout=0.0, attn_dropout=0.0, temperature=0.1,
                    train=train_cfg(epochs=25, lr=1e-2))
    res = train_rpg(split, codes, 8, cfg)
    ev = evaluate_scorer(make_scorer(res.model, 8), split, "test", n_boot=0)
    pop = evaluate_scorer(popularity_scorer(split), split, "test", n_boot=0)
    assert ev.metrics["masked"]["recall@5"] > 0.5 > pop.metrics["masked"]["recall@5"]


def test_next_item_code_gain_separates_predictable_from_random_codes():
    from animind_assets.lib.retrieval.pq import next_item_code_gain

    split = tiny_split(n_users=300)
    prev = np.array([t[-1] for t in split.train])
    ids = np.arange(split.n_items)
    predictable = np.stack([ids % 8, (ids // 8) % 8], axis=1)  # next item's code follows from this item's code
    random_codes = tiny_codes(split.n_items, m=2, k=8, seed=3)
    good = next_item_code_gain(predictable, split.train, prev, split.valid_targets, 8)
    bad = next_item_code_gain(random_codes, split.train, prev, split.valid_targets, 8)
    assert good.shape == (2,) and good[0] > 1.0  # ln 8 = 2.08 at most; smoothing takes part of it
    assert good[0] > bad[0] + 0.5
    with pytest.raises(ValueError, match="codes must be"):
        next_item_code_gain(predictable, split.train, prev, split.valid_targets, 4)


def test_train_loop_rejects_nonfinite_loss():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def loss(self, inputs, targets):
            return self.w.sum() / 0.0 * 0.0

        def score(self, inputs):
            return torch.zeros(inputs.shape[0], 40)

    with pytest.raises(ValueError, match="non-finite loss"):
        train_sequence_model(Bad(), tiny_split(), train_cfg(epochs=1))


# ------------------------------------------------------------------------------------------ PQ
@pytest.mark.parametrize("backend,method", [("sklearn", "pq"), ("auto", "opq")])
def test_product_quantization_codes(backend, method):
    if backend == "auto":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24)) * np.linspace(0.1, 10, 24)  # very unequal scales: standardized first
    res = product_quantize(x, PQConfig(n_codebooks=4, codebook_size=16, pca_dim=16, method=method, backend=backend, n_iter=10))
    assert res.codes.shape == (300, 4) and res.codes.dtype == np.int64
    assert res.codes.min() >= 0 and res.codes.max() < 16
    assert res.stats["relative_mse"] < 0.8 and res.stats["distinct_ids"] > 250
    with pytest.raises(ValueError, match="non-finite"):
        product_quantize(np.full((300, 4), np.nan), PQConfig(n_codebooks=2, codebook_size=16, backend=backend, method=method))
    with pytest.raises(ValueError, match="codebook_size"):
        product_quantize(x[:10], PQConfig(n_codebooks=4, codebook_size=16, backend=backend, method=method))


def test_combine_item_vectors_balances_blocks_of_different_width():
    from animind_assets.lib.retrieval.pq import combine_item_vectors

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 384)) * 5.0, rng.normal(size=(50, 16))
    assert combine_item_vectors([b]).shape == (50, 16)
    both = combine_item_vectors([a, b])
    assert both.shape == (50, 400) and both.dtype == np.float32
    # each block carries the same total variance whatever its width or scale
    assert both[:, :384].var(0).sum() == pytest.approx(both[:, 384:].var(0).sum(), rel=1e-3)
    with pytest.raises(ValueError, match="item counts"):
        combine_item_vectors([a, b[:10]])
    with pytest.raises(ValueError, match="no vector blocks"):
        combine_item_vectors([])


def test_sasrec_item_vectors_are_the_item_table_without_padding():
    from animind_assets.lib.retrieval.sasrec import SASRec, SASRecConfig, sasrec_item_vectors

    model = SASRec(12, SASRecConfig(hidden=8, blocks=1, heads=1))
    vec = sasrec_item_vectors(model)
    assert vec.shape == (12, 8) and vec.dtype == np.float32
    np.testing.assert_array_equal(vec[3], model.item_emb.weight[4].detach().numpy())


# ------------------------------------------------------------------------------------------ assets
@pytest.mark.slow
def test_beauty_sequence_assets_train_and_eval_in_process(tmp_path, animind_env):
    import dagster as dg

    from animind_assets.defs.beauty.beauty_embeddings import beauty_embeddings
    from animind_assets.defs.beauty.beauty_eval import beauty_eval
    from animind_assets.defs.beauty.beauty_interactions import beauty_interactions
    from animind_assets.defs.beauty.beauty_items import beauty_items
    from animind_assets.defs.beauty.beauty_pq_codes import beauty_pq_codes
    from animind_assets.defs.beauty.rpg_model import rpg_model
    from animind_assets.defs.beauty.sasrec_model import sasrec_model
    from animind_assets.resources import AniMindDuckDBIOManager, ArtifactStoreResource, DuckDBWarehouse, MlflowResource, ParquetExports
    from animind_assets_tests.retrieval.test_tiger import write_cyclic_prepared

    folder = write_cyclic_prepared(tmp_path / "beauty")
    db = str(animind_env / "animind.duckdb")
    resources = {
        "io_manager": AniMindDuckDBIOManager(database=db, schema="main"),
        "warehouse": DuckDBWarehouse(database=db, schema="main"),
        "artifacts": ArtifactStoreResource(root=str(animind_env / "artifacts")),
        "exports": ParquetExports(root=str(animind_env / "exports")),
        "mlflow": MlflowResource(enabled=False),
    }
    src = {"source": "prepared", "prepared_dir": str(folder)}
    seq = {"max_len": 8, "batch_size": 32, "epochs": 10, "patience": 0, "val_users": 0, "num_threads": 1, "device": "cpu"}
    everything = [beauty_items, beauty_interactions, beauty_embeddings, beauty_pq_codes, sasrec_model, rpg_model, beauty_eval]
    res = dg.materialize(
        everything, resources=resources, instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {
            "beauty_items": {"config": src},
            "beauty_interactions": {"config": src},
            "beauty_embeddings": {"config": {"batch_size": 32}},
            "beauty_pq_codes": {"config": {"n_codebooks": 4, "codebook_size": 8, "pca_dim": 16, "num_threads": 1}},
            "sasrec_model": {"config": {**seq, "hidden": 32, "dropout": 0.0, "lr": 1e-2, "early_stop_metric": "nll"}},
            "rpg_model": {"config": {**seq, "hidden": 32, "heads": 2, "d_ff": 64, "emb_dropout": 0.0, "attn_dropout": 0.0,
                                     "temperature": 0.1, "lr": 1e-2, "warmup_steps": 0,
                                     "item_loss_weight": 1.0, "item_negatives": 0, "distill_weight": 0.5}},
            "beauty_eval": {"config": {"models": ["popularity", "sasrec", "rpg", "tiger"], "n_boot": 50, "num_threads": 1, "device": "cpu"}},
        }},
    )
    assert res.success
    codes = resources["warehouse"].read_table("beauty_pq_codes")
    assert codes.height == 60 and set(codes["codes"].list.len().to_list()) == {4}
    pq_md = res.asset_materializations_for_node("beauty_pq_codes")[0].metadata
    assert pq_md["vectors"].value == "sasrec" and pq_md["vector_dim"].value == 32  # SASRec hidden 32, not MiniLM 384
    table = resources["warehouse"].read_table("beauty_eval")
    rows = {(r["model"], r["masking"]): r for r in table.iter_rows(named=True)}
    pop = rows[("popularity (train+valid counts)", "masked")]
    sas = rows[("SASRec-CE", "masked")]
    assert sas["recall@10"] > pop["recall@10"] + 0.3, rows  # the cycle is learned
    assert sas["recall@10_lo"] <= sas["recall@10"] <= sas["recall@10_hi"]
    assert any(m.startswith("RPG") for m, _ in rows) and ("SASRec-CE", "unmasked") in rows
    assert rows[("TIGER paper (Rajput et al. 2023)", "as published")]["kind"] == "published"
    assert {r["users"] for r in table.iter_rows(named=True) if r["kind"] != "published"} == {200}
    md = res.asset_materializations_for_node("beauty_eval")[0].metadata
    assert "comparison_plot_masked" in md and "protocol" in md
    md = res.asset_materializations_for_node("sasrec_model")[0].metadata
    assert md["epochs"].value == 10 and "validation_curve" in md
    assert md["early_stop_metric"].value == "nll" and md["best_val_nll"].value > 0 and "val_nll" in md["history"].value
    assert res.asset_materializations_for_node("rpg_model")[0].metadata["distill_weight"].value == 0.5  # taught by sasrec_model

    # TIGER on collaborative IDs: RQ-KMeans of this sasrec_model's item embeddings, then one more eval row
    from animind_assets.defs.beauty.tiger_model import tiger_model
    from animind_assets_tests.retrieval.test_tiger import TINY

    tcfg = {**TINY, "d_model": 48, "d_ff": 96, "batch_size": 32, "lr": 1e-2, "warmup_steps": 10, "max_steps": 60,
            "eval_every_steps": 30, "val_users": 0, "val_beams": 10, "patience": 0,
            "collaborative_levels": 2, "collaborative_codebook_size": 4}
    instance = dg.DagsterInstance.ephemeral()
    res = dg.materialize([*everything, tiger_model], selection=[tiger_model], partition_key="collaborative", resources=resources,
                         instance=instance, run_config={"ops": {"tiger_model": {"config": tcfg}}})
    assert res.success
    md = res.asset_materializations_for_node("tiger_model")[0].metadata
    assert md["id_source"].value == "collaborative" and md["id_levels"].value == 3 and "id_stats" in md
    import json

    codec = json.loads((animind_env / "artifacts" / "tiger_model" / "collaborative" / "model" / "codec.json").read_text())
    assert len(codec["item_ids"]) == 60 and len({tuple(v) for v in codec["codes"]}) == 60
    res = dg.materialize([*everything, tiger_model], selection=[beauty_eval], resources=resources, instance=instance,
                         run_config={"ops": {"beauty_eval": {"config": {"models": ["tiger"], "tiger_partitions": ["collaborative"],
                                                                        "tiger_beams": 10, "n_boot": 20, "num_threads": 1, "device": "cpu"}}}})
    assert res.success
    table = resources["warehouse"].read_table("beauty_eval")
    tiger_rows = [r for r in table.iter_rows(named=True) if r["model"] == "TIGER [collaborative IDs]"]
    assert {r["masking"] for r in tiger_rows} == {"masked", "unmasked"} and all(r["invalid_id_rate"] == 0.0 for r in tiger_rows)


@pytest.mark.slow
def test_tiger_on_the_shared_evaluation_matches_its_own_metrics():
    from animind_assets.lib.retrieval.tiger import TigerConfig, evaluate, evaluate_on_split, leave_one_out, train_tiger
    from animind_assets_tests.retrieval.test_tiger import TINY, cyclic_codec, cyclic_sequences

    seqs = cyclic_sequences(n_users=40)
    codec = cyclic_codec()
    tsplit = leave_one_out(seqs, max_history=5)
    cfg = TigerConfig(**{**TINY, "d_model": 48, "d_ff": 96}, batch_size=32, lr=1e-2, warmup_steps=10, epochs=100,
                      max_steps=10, eval_every_steps=10, val_users=0, val_beams=10, patience=0)
    model = train_tiger(tsplit, codec, cfg).model
    split = SequenceSplit.from_sequences(seqs, n_items=60)
    assert split.users.tolist() == tsplit.test.users.tolist()  # same users, same order
    res = evaluate_on_split(model, codec, split, max_history=5, beams=10, n_boot=0)
    own = evaluate(model, codec, tsplit.test, ks=(5, 10), beams=10)
    assert res.metrics["unmasked"]["recall@10"] == pytest.approx(own["recall@10"])
    assert res.metrics["unmasked"]["ndcg@5"] == pytest.approx(own["ndcg@5"])
    assert res.extra["invalid_id_rate"] == 0.0


def test_rqkmeans_ids_of_a_small_catalog_keep_every_level_informative():
    """../shared/cases kind "a catalog of 100 items with the default 3 x 256 codes": level 1 gave every item
    its own code and levels 2-3 were constant. The small-catalog rule fits max(2, N // 4) codes per level
    instead, says so in the stats, and every deeper level uses more than one code."""
    from animind_assets.lib.retrieval.tiger_data import rqkmeans_ids

    vec = np.random.default_rng(0).normal(size=(100, 32)).astype(np.float32)
    codes, stats = rqkmeans_ids(vec)  # defaults: 3 levels x 256
    assert codes.shape == (100, 4) and len({tuple(r) for r in codes.tolist()}) == 100
    assert stats["codebook_size"] == 25 and stats["requested_codebook_size"] == 256 and "100 items" in stats["note"]
    assert all(len(set(codes[:, j].tolist())) > 1 for j in range(3)), stats
    assert codes[:, :3].max() < 25


def test_rqkmeans_ids_with_codebooks_give_the_centroids_the_codes_came_from():
    """``with_codebooks=True`` (for the LM's projection warm start): one (codebook_size, D) array per level,
    and every item's level-1 code is its nearest level-1 centroid (in the centred, normalised space)."""
    from animind_assets.lib.retrieval.tiger_data import rqkmeans_ids

    vec = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    codes, stats, books = rqkmeans_ids(vec, levels=2, codebook_size=16, with_codebooks=True)
    assert [b.shape for b in books] == [(16, 8), (16, 8)] and codes.shape == (300, 3)
    x = vec - vec.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    nearest = ((x[:, None, :] - books[0][None]) ** 2).sum(-1).argmin(1)
    assert (nearest == codes[:, 0]).mean() > 0.99
    assert rqkmeans_ids(vec, levels=2, codebook_size=16)[0].tolist() == codes.tolist()


def test_rqkmeans_ids_of_item_vectors_are_unique_and_follow_the_clusters():
    """RQ-KMeans IDs of arbitrary item vectors (TIGER's collaborative-ID option): one row per item,
    levels + 1 codes, all IDs unique, items of one tight cluster share their first code, bad input refused."""
    from animind_assets.lib.retrieval.tiger_data import rqkmeans_ids

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 10
    vec = np.repeat(centres, 30, axis=0) + rng.normal(scale=0.01, size=(120, 16))
    codes, stats = rqkmeans_ids(vec, levels=2, codebook_size=4)
    assert codes.shape == (120, 3) and len({tuple(r) for r in codes.tolist()}) == 120
    assert all(len(set(codes[g * 30:(g + 1) * 30, 0].tolist())) == 1 for g in range(4))
    assert len(set(codes[::30, 0].tolist())) == 4
    assert stats["levels"] == 3 and stats["max_collision_group"] >= 1 and len(stats["inertias"]) == 2
    with pytest.raises(ValueError, match="non-empty"):
        rqkmeans_ids(np.zeros((0, 4)))
    bad = vec.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        rqkmeans_ids(bad, levels=2, codebook_size=4)


def test_training_progress_eta_is_the_budget_left_when_the_time_budget_ends_first(monkeypatch):
    """``Progress(budget_s=...)`` (SASRec/RPG/TIGER training under ``max_train_seconds``): the ETA is the sooner of the
    steps left at the current rate and the budget left, marked ``(time budget)`` when the budget ends first."""
    from animind_assets.lib.common import progress as progress_mod

    now = [1000.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    lines: list[str] = []
    p = progress_mod.Progress("sasrec-ce train", total=35000, unit="steps", log=lines.append, every_s=0, budget_s=60)
    now[0] += 10.0
    p.update(100)  # 10 steps/s: 3,490 s of steps left, 50 s of budget left
    assert lines[-1].endswith("ETA 50.0s (time budget)")
    unbounded = progress_mod.Progress("x", total=35000, unit="steps", log=lines.append, every_s=0)
    now[0] += 10.0
    unbounded.update(100)
    assert lines[-1].endswith("ETA 58m10s")
    short = progress_mod.Progress("y", total=200, unit="steps", log=lines.append, every_s=0, budget_s=600)
    now[0] += 10.0
    short.update(100)  # the steps end before the budget: the plain ETA
    assert lines[-1].endswith("ETA 10.0s")
