"""The README documents the two front-door commands and every launchpad knob (generated reference)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_has_front_door_commands():
    text = (ROOT / "README.md").read_text()
    assert "bash .ci/install && .venv/bin/animind demo" in text
    assert ".venv/bin/python -m pytest" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest" in ci


def test_readme_config_reference_is_current():
    from animind_assets.config_reference import config_reference_markdown

    text = (ROOT / "README.md").read_text()
    generated = config_reference_markdown()
    missing = [line for line in generated.splitlines() if line.startswith("| `") and line not in text]
    assert not missing, f"README config reference is stale; regenerate with python -m animind_assets.config_reference: {missing[:5]}"
