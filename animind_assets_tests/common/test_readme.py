"""The README is the front door (two commands, <= 250 lines); the generated config reference in docs/ is current."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_has_front_door_commands():
    text = (ROOT / "README.md").read_text()
    assert "bash .ci/install && .venv/bin/animind demo" in text
    assert ".venv/bin/python -m pytest" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest" in ci


def test_readme_is_short_and_links_exist():
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for link in re.findall(r"\]\(((?:docs)/[^)#]+)\)", text):
        assert (ROOT / link).exists(), f"README links to missing {link}"


def test_config_reference_is_current():
    from animind_assets.config_reference import config_reference_markdown

    text = (ROOT / "docs" / "config-reference.md").read_text()
    generated = config_reference_markdown()
    missing = [line for line in generated.splitlines() if line.startswith("| `") and line not in text]
    assert not missing, (
        "docs/config-reference.md is stale; regenerate with "
        f"python -m animind_assets.config_reference > docs/config-reference.md: {missing[:5]}"
    )


def test_layout_listing_in_the_guide_matches_the_tree():
    """docs/guide/layout-and-storage.md lists every module of every package folder it names."""
    import re

    text = (ROOT / "docs" / "guide" / "layout-and-storage.md").read_text()
    listed = {m.group(1): set(m.group(2).split()) for m in re.finditer(r"^(animind_assets(?:_tests)?/[\w/]*)  (.*)$", text, re.M)}
    assert len(listed) > 20
    stale = {}
    for folder, names in listed.items():
        actual = {f.stem for f in (ROOT / folder).glob("*.py") if f.stem != "__init__"}
        if names != actual:
            stale[folder] = {"missing": sorted(actual - names), "gone": sorted(names - actual)}
    assert not stale, f"update the module listing in docs/guide/layout-and-storage.md: {stale}"
