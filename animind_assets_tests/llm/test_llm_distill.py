"""Knowledge distillation of a next-item teacher into the semantic-ID LM (``lib/llm/distill.py``): the code-level
targets factorise the teacher's item softmax exactly, land on the right label positions, only where an item
follows another item of the same completion; the loss mixes them in as documented; the fine-tune uses them."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from animind_assets.lib.llm.distill import SidDistiller, ensemble_teacher, position_logits_teacher
from animind_assets.lib.semantic_ids.tokens import level_tokens, sid_codes
from animind_assets_tests.llm.test_llm_beauty import SEQ_CFG, tiny_beauty

EOS = 2


class FakeTeacher:
    """Seeded logits that depend on the whole prefix (so a wrong prefix gives other targets); records calls."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self.calls: list[list[list[int]]] = []

    def logits_after(self, prefix: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(1 + sum((k + 1) * 31**j for j, k in enumerate(prefix)) % 100_003)
        return torch.randn(self.n_items, generator=g) * 2

    def __call__(self, seqs: list[list[int]]) -> torch.Tensor:
        self.calls.append([list(s) for s in seqs])
        return torch.stack([self.logits_after(s[:t]) for s in seqs for t in range(1, len(s))])


def _catalog():
    items, _, sids = tiny_beauty()
    vocab: dict[str, int] = {}
    for s in sids["semantic_id"].to_list():
        for t in level_tokens(sid_codes(s)):
            vocab.setdefault(t, 1000 + len(vocab))
    return sids, vocab


def _ids(sid: str, vocab: dict[str, int]) -> list[int]:
    return [vocab[t] for t in level_tokens(sid_codes(sid))]


def test_code_level_targets_factorise_the_teacher_softmax():
    sids, vocab = _catalog()
    n = sids.height
    sid = dict(zip(sids["item_id"].to_list(), sids["semantic_id"].to_list()))
    teacher = FakeTeacher(n)
    d = SidDistiller(sids["item_id"].to_list(), sids["semantic_id"].to_list(), vocab.__getitem__, teacher, n, temperature=0.7)
    prompt = [-100] * 5
    a, b, c, x = 3, 1, 2, 7  # items 1 and 2 share their first three codes (told apart by the last level)
    row0 = prompt + _ids(sid[a], vocab) + _ids(sid[b], vocab) + _ids(sid[c], vocab) + [EOS]
    row1 = prompt + _ids(sid[x], vocab) + [EOS]  # one item (the question form): nothing to distill
    row2 = prompt + _ids(sid[a], vocab) + [55] + _ids(sid[x], vocab) + _ids(sid[b], vocab) + [EOS]  # a non-ID token breaks it
    width = max(map(len, (row0, row1, row2)))
    labels = torch.full((3, width), -100, dtype=torch.long)
    for i, r in enumerate((row0, row1, row2)):
        labels[i, : len(r)] = torch.as_tensor(r)
    out = d.batch_targets(labels)
    assert teacher.calls == [[[a, b, c], [x, b]]]  # row 2's history restarts after the non-ID token
    n_lev = len(sid_codes(sid[a]))
    assert len(out.flat_index) == 3 * n_lev and out.targets.shape == (3 * n_lev, len(out.token_ids))
    # the soft targets sit at the label positions of the targets' ID tokens (completion_loss's flattening)
    flat_labels = labels[:, 1:][labels[:, 1:] != -100]
    targets = [(b, [a]), (c, [a, b]), (b, [x])]
    want_tokens = [t for item, _ in targets for t in _ids(sid[item], vocab)]
    # flat_index is level-major (all level-1 positions, then level 2, ...); compare as sets per level
    got = flat_labels[out.flat_index].tolist()
    by_level = [want_tokens[lv::n_lev] for lv in range(n_lev)]
    assert got == [t for lv in range(n_lev) for t in by_level[lv]]
    col = {t: j for j, t in enumerate(out.token_ids.tolist())}
    assert torch.allclose(out.targets.sum(1), torch.ones(len(out.flat_index)))
    for m, (item, prefix) in enumerate(targets):
        p = torch.softmax(teacher.logits_after(prefix) / 0.7, 0)
        prod = 1.0
        for lv, t in enumerate(_ids(sid[item], vocab)):
            q = out.targets[lv * len(targets) + m]
            prod *= float(q[col[t]])
            # mass only on level-lv tokens
            level_cols = [col[tt] for tt, li in d.level_of.items() if li == lv]
            assert float(q[level_cols].sum()) == pytest.approx(1.0, abs=1e-5)
        assert prod == pytest.approx(float(p[item]), rel=1e-4)  # prod_l q_l(code_l) = p(item): exact
    assert d.positions_distilled == 3
    assert d.batch_targets(labels[1:2]) is None  # a lone item per completion: no teacher call, no targets
    with pytest.raises(ValueError, match="share the semantic ID"):
        SidDistiller([0, 1], [sid[a], sid[a]], vocab.__getitem__, teacher, n)
    with pytest.raises(ValueError, match="outside"):
        SidDistiller([n], [sid[a]], vocab.__getitem__, teacher, n)


def test_position_logits_teacher_scores_every_prefix_as_the_sasrec_does():
    from animind_assets.lib.retrieval.sasrec import SASRec, SASRecConfig

    cfg = SASRecConfig(hidden=16, blocks=1, heads=1, dropout=0.0)
    cfg.train.max_len = 4
    torch.manual_seed(0)
    model = SASRec(12, cfg)
    teacher = position_logits_teacher(model)
    seqs = [[3, 5, 7], [1, 2, 3, 4, 5, 6]]  # the second is longer than max_len: each target gets its own window
    got = teacher(seqs)
    # a sequence that fits: one pass, every position a row, as SASRec trains (right-aligned positions)
    short = model.position_logits(torch.as_tensor([[3, 5]]) + 1, torch.ones((1, 2), dtype=torch.bool))
    # a longer one: the target after s[:t] is scored from the last max_len items of s[:t]
    long = [model.score(torch.as_tensor([seqs[1][max(0, t - 4):t]]) + 1)[0] for t in range(1, 6)]
    assert got.shape == (2 + 5, 12)
    assert torch.allclose(got[:2], short, atol=1e-5) and torch.allclose(got[2:], torch.stack(long), atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_ensemble_teacher_averages_the_members_probabilities():
    """Two teachers' next-item distributions averaged (not their logits): an item only one member likes keeps
    half its mass; an item both rule out stays -inf; one member is passed through; shapes must agree."""
    a = torch.tensor([[4.0, -4.0, float("-inf"), 0.0], [0.0, 1.0, 2.0, float("-inf")]])
    b = torch.tensor([[-4.0, 4.0, float("-inf"), 0.0], [2.0, 1.0, 0.0, float("-inf")]])
    ens = ensemble_teacher([lambda seqs: a, lambda seqs: b])
    got = ens([[0, 1, 2]])
    want = 0.5 * (torch.softmax(a, 1) + torch.softmax(b, 1))
    assert torch.allclose(torch.softmax(got, 1), want, atol=1e-6)  # a proper distribution, the mean one
    assert torch.allclose(got.exp().sum(1), torch.ones(2), atol=1e-6)  # already log-probabilities
    assert torch.isinf(got[0, 2]) and torch.isinf(got[1, 3])
    # the mean of logits would tie items 0, 1 and 3 of row 0 (all 0.0): the probability mean keeps 0 and 1 likely
    assert got[0, 0] > got[0, 3] + 1.0
    # a member that scores nothing at a position (an all -inf row) is left out of that row's mean, not NaN
    c = b.clone()
    c[1] = float("-inf")
    got = ensemble_teacher([lambda seqs: a, lambda seqs: c])([[0, 1, 2]])
    assert torch.allclose(torch.softmax(got[1], 0), torch.softmax(a[1], 0), atol=1e-6)
    assert torch.allclose(torch.softmax(got[0], 0), want[0], atol=1e-6)
    nothing = torch.full_like(a, float("-inf"))
    assert torch.isneginf(ensemble_teacher([lambda seqs: nothing, lambda seqs: nothing])([[0, 1]])).all()
    single = lambda seqs: a  # noqa: E731
    assert ensemble_teacher([single]) is single
    with pytest.raises(ValueError, match="at least one"):
        ensemble_teacher([])
    with pytest.raises(ValueError, match="different shapes"):
        ensemble_teacher([lambda seqs: a, lambda seqs: a[:1]])([[0, 1]])


def test_ensemble_of_two_sasrecs_scores_the_mean_of_their_item_distributions():
    """Two real SASRecs through ``position_logits_teacher`` (one row per target position, windowed rows included):
    the ensemble's rows are the log of their averaged next-item distributions."""
    from animind_assets.lib.retrieval.sasrec import SASRec, SASRecConfig

    cfg = SASRecConfig(hidden=16, blocks=1, heads=1, dropout=0.0)
    cfg.train.max_len = 4
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(SASRec(12, cfg))
    seqs = [[3, 5, 7], [1, 2, 3, 4, 5, 6]]
    members = [position_logits_teacher(m)(seqs) for m in models]
    got = ensemble_teacher([position_logits_teacher(m) for m in models])(seqs)
    want = torch.stack([torch.softmax(x, 1) for x in members]).mean(0)
    assert got.shape == (7, 12) and torch.allclose(got.exp(), want, atol=1e-6)
    from animind_assets.lib.llm.distill import model_teacher

    with pytest.raises(ValueError, match="at least one model"):
        model_teacher([])


def test_completion_loss_mixes_the_soft_targets_as_documented():
    from animind_assets.lib.llm.distill import DistillBatch
    from animind_assets.lib.llm.losses import completion_loss
    from animind_assets_tests.llm_fixtures import smollm2_tokenizer, tiny_llama

    tok = smollm2_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(tok).eval()
    ids = torch.randint(5, 200, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    token_ids = torch.as_tensor([10, 11, 12])
    q = torch.as_tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    batch = DistillBatch(torch.as_tensor([1, 6]), q, token_ids)
    with torch.no_grad():
        hard, n, _ = completion_loss(model, ids, None, labels)
        mixed, _, _ = completion_loss(model, ids, None, labels, distill=batch, distill_weight=0.25)
        off, _, _ = completion_loss(model, ids, None, labels, distill=batch, distill_weight=0.0)
        logits = model(input_ids=ids).logits[:, :-1][labels[:, 1:] != -100].float()
    logp = torch.log_softmax(logits, -1)
    y = labels[:, 1:][labels[:, 1:] != -100]
    ce = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    soft = -(q * logp[[1, 6]][:, token_ids]).sum(1)
    want = (ce.sum() + 0.25 * (soft - ce[[1, 6]]).sum()) / n
    assert float(off) == pytest.approx(float(hard))
    assert float(mixed) == pytest.approx(float(want), rel=1e-4)
    assert abs(float(mixed) - float(hard)) > 1e-4  # a near-uniform tiny model: the targets still move the loss


def test_finetune_distills_sequence_rows_and_refuses_without_a_teacher(tmp_path):
    from animind_assets.lib.llm.finetune import run_finetune
    from animind_assets.lib.llm.sequence_data import build_next_item_dataset, item_lookup
    from animind_assets_tests.llm_fixtures import smollm2_tokenizer, tiny_finetune_config, tiny_llama

    items, inter, sids = tiny_beauty()
    df = build_next_item_dataset(items, inter, sids, SEQ_CFG).frame
    lookup = item_lookup(items, sids)
    cfg = tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=3, english_ppl=False, linking_eval_items=0,
                               phase2_weights={"A": 0.0, "B": 1.0, "C": 0.0}, distill_weight=0.5)
    tok = smollm2_tokenizer()
    with pytest.raises(ValueError, match="needs a teacher"):
        run_finetune(df, lookup, cfg, tmp_path / "w0", special_tokens=(), base=(tiny_llama(tok), tok))
    teacher = FakeTeacher(items.height)
    res = run_finetune(df, lookup, cfg, tmp_path / "w1", special_tokens=(), base=(tiny_llama(tok), tok),
                       teacher=teacher, teacher_items=items.height)
    assert teacher.calls and res.metrics["distill_positions"] > 0 and 0 < res.metrics["distill_share"] < 1
    assert all(np.isfinite(h["loss"]) for h in res.history if "loss" in h)
    # every sequence the teacher saw is a run of consecutive items of one user's training sequence
    train_seqs = {int(u): list(map(int, s)) for u, s in
                  inter.sort(["user_id", "seq"]).group_by("user_id", maintain_order=True).agg("item_id").iter_rows()}
    seen = [s for call in teacher.calls for s in call]
    assert all(any(_is_run(s, full[:-2]) for full in train_seqs.values()) for s in seen)
    with pytest.raises(ValueError, match="distill_weight"):
        tiny_finetune_config(distill_weight=1.5).validate()
    with pytest.raises(ValueError, match="fast_loss"):
        tiny_finetune_config(distill_weight=0.5, fast_loss=False).validate()


def _is_run(s: list[int], seq: list[int]) -> bool:
    return any(seq[i : i + len(s)] == s for i in range(len(seq) - len(s) + 1))


def test_ease_teacher_scores_the_prefix_set_and_the_fitted_temperature_recovers_a_known_one():
    from animind_assets.lib.llm.distill import ease_teacher, fit_temperature
    from animind_assets.lib.retrieval.item_baselines import EASE

    inter = pl.DataFrame({"user_id": [1, 1, 1, 2, 2, 3, 3, 3], "anime_id": [10, 11, 12, 10, 12, 11, 12, 13]})
    ease = EASE(inter, {1, 2, 3}, lam=1.0)
    teacher = ease_teacher(ease, 20)
    got = teacher([[10, 12, 11], [14, 13]])  # 14: unknown to EASE (no score of its own, no contribution)
    col = {int(a): i for i, a in enumerate(ease.items.tolist())}
    want0 = ease.B[col[10]]
    want1 = ease.B[col[10]] + ease.B[col[12]]
    assert got.shape == (3, 20)
    for r, want, prefix in ((0, want0, [10]), (1, want1, [10, 12])):
        for a, i in col.items():
            if a in prefix:
                assert got[r, a] == float("-inf")
            else:
                assert float(got[r, a]) == pytest.approx(float(want[i]), abs=1e-5)
        assert float(got[r, 5]) == float("-inf")  # items in no training list: no share of the softmax
    assert float(got[2, 14]) == float("-inf") and float(got[2, 10]) == 0.0 == float(got[2, 13])  # the unknown 14 adds nothing
    with pytest.raises(ValueError, match="beyond the teacher width"):
        ease_teacher(ease, 12)

    # a teacher whose logits are 4 x log p: the fitted temperature is 4 (the next items are drawn from p)
    p = torch.tensor([0.5, 0.25, 0.15, 0.1])
    scaled = lambda seqs: torch.log(p).mul(4.0).repeat(sum(len(s) - 1 for s in seqs), 1)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    seqs = [[0] + torch.multinomial(p, 20, replacement=True, generator=g).tolist() for _ in range(50)]
    T, nll = fit_temperature(scaled, seqs, grid=[1.0, 2.0, 4.0, 8.0])
    assert T == 4.0 and nll[4.0] < nll[2.0] and nll[4.0] < nll[8.0]
    with pytest.raises(ValueError, match="two or more"):
        fit_temperature(scaled, [[1]])


def test_small_temperatures_and_ruled_out_items_give_targets_not_zeros_or_nans():
    """Weights in log space: at T = 1e-3 every level's target still sums to 1 (an absolute softmax underflows to 0
    for the whole prefix group); a teacher row that rules out every item of the target's prefix leaves the plain
    loss there (no NaN), and a row with nothing allowed at all gives no target."""
    from animind_assets.lib.llm.distill import fit_temperature, teacher_fingerprint

    sids, vocab = _catalog()
    n = sids.height
    sid = dict(zip(sids["item_id"].to_list(), sids["semantic_id"].to_list()))
    base = FakeTeacher(n)
    d = SidDistiller(sids["item_id"].to_list(), sids["semantic_id"].to_list(), vocab.__getitem__, base, n, temperature=1e-3)
    row = [-100] * 3 + _ids(sid[3], vocab) + _ids(sid[1], vocab) + [EOS]
    out = d.batch_targets(torch.as_tensor([row]))
    assert torch.isfinite(out.targets).all() and torch.allclose(out.targets.sum(1), torch.ones(len(out.flat_index)))

    def ruled_out(seqs):  # item 1's prefix group (items 1, 2) is impossible; everything else allowed
        z = base(seqs)
        z[:, [1, 2]] = float("-inf")
        return z

    d2 = SidDistiller(sids["item_id"].to_list(), sids["semantic_id"].to_list(), vocab.__getitem__, ruled_out, n)
    out2 = d2.batch_targets(torch.as_tensor([row]))
    assert out2 is not None and torch.isfinite(out2.targets).all() and torch.allclose(out2.targets.sum(1), torch.ones(len(out2.flat_index)))
    codes1 = sid_codes(sid[1])
    shared = sum(1 for a, b in zip(codes1, sid_codes(sid[2])) if a == b)  # levels 1..shared of item 1 have allowed items
    assert len(out2.flat_index) == sum(1 for lv in range(len(codes1)) if any(
        sid_codes(sid[i])[:lv] == codes1[:lv] and i not in (1, 2) for i in range(n))) and shared >= 1
    nothing = SidDistiller(sids["item_id"].to_list(), sids["semantic_id"].to_list(), vocab.__getitem__,
                           lambda seqs: torch.full((sum(len(s) - 1 for s in seqs), n), float("-inf")), n)
    assert nothing.batch_targets(torch.as_tensor([row])) is None and nothing.positions_distilled == 0
    # fit_temperature leaves out next items the teacher rules out (no NaN, no 1e4 clamps)
    T, nll = fit_temperature(ruled_out, [[3, 1, 5, 6], [0, 2, 7]], grid=[0.5, 1.0, 2.0])
    assert all(np.isfinite(v) for v in nll.values()) and T in (0.5, 1.0, 2.0)
    # the fingerprint that keeps checkpoints of another teacher from being resumed
    w = np.arange(6, dtype=np.float32)
    assert teacher_fingerprint(w, lam=1) == teacher_fingerprint(w.copy(), lam=1)
    assert teacher_fingerprint(w, lam=1) != teacher_fingerprint(w, lam=2) != teacher_fingerprint(w + 1, lam=2)


def test_distillation_is_refused_when_no_row_could_use_it(tmp_path):
    from animind_assets.lib.llm.finetune import run_finetune
    from animind_assets.lib.llm.sequence_data import build_next_item_dataset, item_lookup
    from animind_assets_tests.llm.test_llm_beauty import CFG
    from animind_assets_tests.llm_fixtures import smollm2_tokenizer, tiny_finetune_config, tiny_llama

    items, inter, sids = tiny_beauty()
    df = build_next_item_dataset(items, inter, sids, CFG).frame  # the question form: one ID per answer
    tok = smollm2_tokenizer()
    with pytest.raises(ValueError, match="next_id_format: sequence"):
        run_finetune(df, item_lookup(items, sids), tiny_finetune_config(distill_weight=0.5), tmp_path / "w",
                     special_tokens=(), base=(tiny_llama(tok), tok), teacher=FakeTeacher(items.height),
                     teacher_items=items.height)


def test_checkpoints_of_another_teacher_are_not_resumed(tmp_path):
    """The resume kind of fault (../shared/cases: resumed silently with changed settings): the teacher's fingerprint
    is part of the work folder's, so a run against another teacher starts its own checkpoints."""
    from animind_assets.lib.llm.finetune import run_finetune
    from animind_assets.lib.llm.sequence_data import build_next_item_dataset, item_lookup
    from animind_assets_tests.llm_fixtures import smollm2_tokenizer, tiny_finetune_config, tiny_llama

    items, inter, sids = tiny_beauty()
    df = build_next_item_dataset(items, inter, sids, SEQ_CFG).frame
    cfg = tiny_finetune_config(phase1_max_steps=0, phase2_max_steps=1, english_ppl=False, linking_eval_items=0,
                               distill_weight=0.5, keep_checkpoints=True)
    dirs = []
    for fp in ("teacher-a", "teacher-b", "teacher-a"):
        tok = smollm2_tokenizer()
        run_finetune(df, item_lookup(items, sids), cfg, tmp_path / "work", special_tokens=(), base=(tiny_llama(tok), tok),
                     teacher=FakeTeacher(items.height), teacher_items=items.height, teacher_fingerprint=fp)
        dirs.append(sorted(p.name for p in (tmp_path / "work").iterdir()))
    assert len(dirs[0]) == 1 and len(dirs[1]) == 2 and dirs[2] == dirs[1]  # b gets its own folder; a again reuses a's


def test_the_temperature_fitted_on_held_out_items_scores_only_each_sequences_last_item():
    from animind_assets.lib.llm.distill import HELDOUT_TEMPERATURE_GRID, fit_temperature

    # logits = 4 x log p at every position; the earlier items of each sequence are always item 0 (a teacher that
    # memorised its training positions looks sharp there), only the last item is drawn from p
    p = torch.tensor([0.5, 0.25, 0.15, 0.1])
    scaled = lambda seqs: torch.log(p).mul(4.0).repeat(sum(len(s) - 1 for s in seqs), 1)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    last = torch.multinomial(p, 400, replacement=True, generator=g).tolist()
    seqs = [[0, 0, 0, 0, x] for x in last]
    grid = [1.0, 2.0, 4.0, 8.0]
    t_all, _ = fit_temperature(scaled, seqs, grid=grid)
    t_last, nll = fit_temperature(scaled, seqs, grid=grid, last_only=True)
    assert t_last == 4.0 and nll[4.0] < nll[2.0] and nll[4.0] < nll[8.0]
    assert t_all == 1.0  # in-sample, the three item-0 positions per sequence pull it to the sharpest grid value
    # the held-out grid of run_finetune reaches EASE-like scales (logits = log p / 40: T = 1/40) and T 1 is scored
    t_ease, nll = fit_temperature(lambda seqs: scaled(seqs) / 160.0, seqs, grid=HELDOUT_TEMPERATURE_GRID, last_only=True)
    assert t_ease == pytest.approx(0.025, rel=0.1) and 1.0 in nll


def test_finetune_fits_the_temperature_on_the_validation_items_when_asked(tmp_path):
    from animind_assets.lib.llm.finetune import run_finetune
    from animind_assets.lib.llm.sequence_data import build_next_item_dataset, item_lookup
    from animind_assets_tests.llm_fixtures import smollm2_tokenizer, tiny_finetune_config, tiny_llama

    items, inter, sids = tiny_beauty()
    df = build_next_item_dataset(items, inter, sids, SEQ_CFG).frame
    lookup = item_lookup(items, sids)
    val = df.filter((pl.col("split") == "validation") & (pl.col("task") == "B"))
    want = {tuple(h) + (t,) for h, t in val.select("history_anime_ids", "target_anime_id").iter_rows() if len(h)}
    assert want
    with pytest.raises(ValueError, match="distill_temperature_fit"):
        tiny_finetune_config(distill_weight=0.5, distill_temperature=0.0, distill_temperature_fit="test").validate()
    with pytest.raises(ValueError, match="set distill_temperature 0"):  # a fit that would be silently ignored
        tiny_finetune_config(distill_weight=0.5, distill_temperature=1.0, distill_temperature_fit="validation").validate()
    tok = smollm2_tokenizer()
    for fit in ("validation", "train"):
        teacher = FakeTeacher(items.height)
        cfg = tiny_finetune_config(phase1_max_steps=1, phase2_max_steps=1, english_ppl=False, linking_eval_items=0,
                                   phase2_weights={"A": 0.0, "B": 1.0, "C": 0.0}, distill_weight=0.5,
                                   distill_temperature=0.0, distill_temperature_fit=fit)
        res = run_finetune(df, lookup, cfg, tmp_path / fit, special_tokens=(), base=(tiny_llama(tok), tok),
                           teacher=teacher, teacher_items=items.height)
        fitted_on = {tuple(s) for s in teacher.calls[0]}  # the first calls fit the temperature, before any step
        assert res.metrics["distill_temperature_fitted"] > 0
        if fit == "validation":
            assert fitted_on <= want and want <= {tuple(s) for call in teacher.calls for s in call}
            assert res.metrics["distill_teacher_nll_heldout_t1"] >= res.metrics["distill_teacher_nll_heldout"]
        else:  # in-sample: training sequences only, never a held-out item
            assert not fitted_on & want
