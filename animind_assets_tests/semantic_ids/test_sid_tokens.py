"""The semantic-ID token format has one owner (lib/semantic_ids/tokens.py); inference never imports training code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from animind_assets.lib.semantic_ids import tokens as st

PKG = Path(__file__).resolve().parents[2] / "animind_assets"
OWNER = PKG / "lib" / "semantic_ids" / "tokens.py"


def test_round_trip_and_strict_parse():
    sid = st.sid_string([47, 203, 9, 0])
    assert sid == "<L1_47><L2_203><L3_9><L4_0>"
    assert st.parse_sid(sid) == [(1, 47), (2, 203), (3, 9), (4, 0)]
    assert st.sid_codes(sid) == [47, 203, 9, 0]
    assert st.split_sid(sid) == ["<L1_47>", "<L2_203>", "<L3_9>", "<L4_0>"]
    for bad in ("", "<L1_2> <L2_3>", "x<L1_2>", "<L1_2>tail", "<L1_-2>", "<l1_2>"):
        with pytest.raises(ValueError):
            st.parse_sid(bad)
    with pytest.raises(ValueError):
        st.level_token(0, 3)
    assert st.parse_level_token("<L12_305>") == (12, 305)


def test_lenient_finders_and_leading_sid():
    text = "Watched <anime_start><L1_2><L2_3><anime_end><liked> then <L1_9><L2_0>."
    assert st.find_sids(text) == ["<L1_2><L2_3>", "<L1_9><L2_0>"]
    assert st.find_level_tokens(text) == [(1, 2), (2, 3), (1, 9), (2, 0)]
    assert st.leading_sid("  <L1_2><L2_3><L3_1> tail") == "<L1_2><L2_3><L3_1>"
    assert st.leading_sid("Naruto <L1_2>") == ""
    assert st.sid_tokens_used(["<L2_1><L1_5>", "<L1_5><L1_0>"]) == ["<L1_0>", "<L1_5>", "<L2_1>"]


def test_vocab_lists():
    assert st.level_vocab([2, 1]) == ["<L1_0>", "<L1_1>", "<L2_0>"]
    assert st.level_vocab_from_codes([[1, 0], [0, 2]]) == ["<L1_0>", "<L1_1>", "<L2_0>", "<L2_1>", "<L2_2>"]
    assert st.check_special_tokens([" <a> ", "<a>", "<b>"]) == ["<a>", "<b>"]
    with pytest.raises(ValueError, match="level tokens"):
        st.check_special_tokens(["<L1_3>"])
    assert all(not st.is_level_token(t) for t in st.SPECIAL_TOKENS)


def test_no_other_module_parses_the_format():
    """Only lib/semantic_ids/tokens.py may spell the level-token regex or f-string."""
    pat = re.compile(r"""<L\\d|<L\(\\d|f["']<L\{""")
    offenders = []
    for p in PKG.rglob("*.py"):
        if p == OWNER:
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if pat.search(line):
                offenders.append(f"{p.relative_to(PKG)}:{i}: {line.strip()}")
    assert offenders == []


def test_special_tokens_have_one_definition():
    from animind_assets.lib.llm import data as llm_data
    from animind_assets.lib.llm import model_folder as llm_model_folder
    from animind_assets.lib.semantic_ids import assign as semantic_ids
    from animind_assets.lib.tokenizer import domain_tokenizer

    for mod in (domain_tokenizer, semantic_ids):
        assert list(mod.DEFAULT_SPECIAL_TOKENS) == list(st.SPECIAL_TOKENS)
    assert list(llm_data.SPECIAL_TOKENS) == list(st.SPECIAL_TOKENS)
    assert list(llm_model_folder.DEFAULT_SPECIAL_TOKENS) == list(st.SPECIAL_TOKENS)
    literal = re.compile(r"""["']<(anime_start|anime_end|watch|liked|disliked|dropped)>["']""")
    hits = [p.name for p in PKG.rglob("*.py") if p != OWNER and literal.search(p.read_text(encoding="utf-8"))]
    assert hits == []


def test_inference_does_not_import_training_code():
    code = (
        "import sys, animind_assets.lib.llm.infer, animind_assets.lib.llm.evaluation\n"
        "bad = sorted(m for m in sys.modules if m.endswith(('llm.finetune', 'llm.data')) or m.split('.')[0] in ('dagster', 'trl', 'peft'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PKG.parent)
    assert out.stdout.strip() == ""
