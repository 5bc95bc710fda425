"""The project settings file (animind.yaml): values become config defaults; errors name file and key."""

import re
from pathlib import Path

import dagster as dg
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _uncommented_example(tmp_path: Path) -> Path:
    """animind.example.yaml with its commented-out settings switched on (one leading '#' removed)."""
    text = (ROOT / "animind.example.yaml").read_text()
    lines = [re.sub(r"^# ", "", line) if re.match(r"^# \S|^#   \S", line) else line for line in text.splitlines()]
    out = tmp_path / "animind.yaml"
    out.write_text("\n".join(lines) + "\n")
    return out


def test_shipped_example_is_valid_and_applies(tmp_path):
    import animind_assets.definitions  # noqa: F401 - registers every configurable asset
    from animind_assets.launchpad import CONFIGURABLE, apply_settings, check_settings
    from animind_assets.settings import load_settings

    settings = load_settings(_uncommented_example(tmp_path))
    assert settings.values["anime_prep"] == {"limit": 1500, "include_adult": False}
    check_settings(settings)
    for name, values in settings.values.items():
        cls = apply_settings(CONFIGURABLE[name], name, settings)
        instance = cls()
        for key, value in values.items():
            assert getattr(instance, key) == value, (name, key)
            assert "[animind.yaml:" in cls.model_fields[key].description


def test_settings_become_the_launchpad_defaults(tmp_path):
    from animind_assets.launchpad import apply_settings
    from animind_assets.settings import load_settings

    path = tmp_path / "animind.yaml"
    path.write_text("probe:\n  limit: 150\n  tags: [a, b]\n")

    class ProbeConfig(dg.Config):
        limit: int | None = None
        tags: list[str] = []
        other: int = 3

    cls = apply_settings(ProbeConfig, "probe", load_settings(path))
    assert cls.__name__ == "ProbeConfig" and cls.BUILTIN is ProbeConfig

    @dg.asset
    def probe(config: cls) -> int:  # type: ignore[valid-type]
        return config.limit

    fields = probe.op.config_field.config_type.fields
    assert fields["limit"].default_value == 150  # what the launchpad scaffolds
    assert fields["tags"].default_value == ["a", "b"]
    assert fields["other"].default_value == 3
    assert dg.materialize([probe]).output_for_node("probe") == 150  # a run without config
    one_run = dg.materialize([probe], run_config={"ops": {"probe": {"config": {"limit": 7}}}})
    assert one_run.output_for_node("probe") == 7  # a launchpad edit wins for that run only


@pytest.mark.parametrize(
    "text, message",
    [
        ("probe:\n  limitt: 5\n", r"animind.yaml: probe.limitt: unknown config field of probe"),
        ("probe:\n  limit: lots\n", r"animind.yaml: probe.limit: 'lots' is not valid"),
        ("probe: 5\n", r"animind.yaml: key 'probe' must map config field names to values"),
        ("- probe\n", r"animind.yaml: top level must be a mapping"),
        ("probe: {limit: [\n", r"animind.yaml: not valid YAML"),
    ],
)
def test_bad_settings_name_file_and_key(tmp_path, text, message):
    from animind_assets.launchpad import apply_settings
    from animind_assets.settings import SettingsError, load_settings

    path = tmp_path / "animind.yaml"
    path.write_text(text)

    class ProbeConfig(dg.Config):
        limit: int | None = None

    with pytest.raises(SettingsError, match=message):
        apply_settings(ProbeConfig, "probe", load_settings(path))


def test_unknown_asset_key_and_missing_env_file(tmp_path, monkeypatch):
    from animind_assets.settings import SettingsError, check_unknown_names, load_settings

    path = tmp_path / "animind.yaml"
    path.write_text("anime_prepp:\n  limit: 5\n")
    with pytest.raises(SettingsError, match=r"animind.yaml: unknown key 'anime_prepp'.*configurable: anime_prep"):
        check_unknown_names(load_settings(path), {"anime_prep", "semantic_ids"})
    monkeypatch.setenv("ANIMIND_SETTINGS", str(tmp_path / "nope.yaml"))
    with pytest.raises(SettingsError, match="nope.yaml: settings file named by \\$ANIMIND_SETTINGS does not exist"):
        load_settings()
    monkeypatch.delenv("ANIMIND_SETTINGS")
    assert load_settings(tmp_path / "absent.yaml").values == {}


def test_settings_can_be_switched_off_and_empty_entries_are_checked(tmp_path, monkeypatch):
    """ANIMIND_SETTINGS=none reads no file (tests, config reference); `anime_prepp:` with nothing under it is
    still an unknown key (it used to be dropped silently)."""
    from animind_assets.settings import SettingsError, check_unknown_names, current_settings, load_settings

    monkeypatch.setenv("ANIMIND_SETTINGS", "none")
    assert load_settings().values == {} and current_settings().values == {}
    path = tmp_path / "animind.yaml"
    path.write_text("anime_prepp:\n")
    with pytest.raises(SettingsError, match=r"unknown key 'anime_prepp'"):
        check_unknown_names(load_settings(path), {"anime_prep"})


def test_yaml_boolean_is_not_a_number(tmp_path):
    """`limit: yes` (a YAML boolean) is refused for an int field instead of becoming limit=1."""
    from animind_assets.defs.prep.anime_prep import AnimePrepConfig
    from animind_assets.launchpad import apply_settings
    from animind_assets.settings import SettingsError, load_settings

    path = tmp_path / "animind.yaml"
    path.write_text("anime_prep:\n  limit: yes\n")
    with pytest.raises(SettingsError, match=r"anime_prep.limit: True is not valid"):
        apply_settings(getattr(AnimePrepConfig, "BUILTIN", AnimePrepConfig), "anime_prep", load_settings(path))
    path.write_text("anime_prep:\n  include_adult: yes\n  limit: 7\n")
    cfg = apply_settings(getattr(AnimePrepConfig, "BUILTIN", AnimePrepConfig), "anime_prep", load_settings(path))()
    assert cfg.include_adult is True and cfg.limit == 7
