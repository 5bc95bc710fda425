"""The project settings file (``animind.yaml``): persistent defaults for every asset's config.

Path: ``$ANIMIND_SETTINGS`` when set, else ``<project root>/animind.yaml``; a missing file means "no
settings" (every config keeps its built-in default); ``ANIMIND_SETTINGS=none`` switches the file off. Format: one mapping per asset (or asset check)
name, holding config field names and values, exactly as in the launchpad's ``ops:`` section::

    anime_prep:
      limit: 1500
    anime_embeddings:
      batch_size: 64

The values become the *defaults* of the Dagster config classes when the code location loads
(``animind_assets.launchpad``), so they apply to every run that does not set the field itself:
automated runs (the automation sensor), schedules, ``animind demo`` and the launchpad, which shows
them pre-filled. A value typed in the launchpad applies to that run only. Edit the file, then reload
the code location (UI: Deployment -> Reload, or restart ``dagster dev``).

Errors name the file and key: an unknown asset or field, a value of the wrong type, a file that is
not a mapping of mappings (``SettingsError``). This module never imports Dagster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "ANIMIND_SETTINGS"
DEFAULT_NAME = "animind.yaml"


class SettingsError(ValueError):
    """A settings file that cannot be applied; the message names the file and the key."""


#: ``$ANIMIND_SETTINGS`` values that switch the settings file off (built-in defaults only; the test suite and
#: ``config_reference`` use it so a personal ``animind.yaml`` never leaks into tests or docs)
DISABLED_VALUES = ("none", "off")


def settings_disabled() -> bool:
    """True when ``$ANIMIND_SETTINGS`` is ``none``/``off``: no settings file is read."""
    return os.environ.get(ENV_VAR, "").strip().lower() in DISABLED_VALUES


def settings_path() -> Path:
    """``$ANIMIND_SETTINGS`` or ``<project root>/animind.yaml`` (the file need not exist)."""
    explicit = os.environ.get(ENV_VAR, "").strip()
    return Path(explicit).expanduser().resolve() if explicit else PROJECT_ROOT / DEFAULT_NAME


@dataclass
class Settings:
    """Parsed settings: ``values[name][field] = value``; ``path`` is the file they came from."""

    path: Path
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    exists: bool = False

    def for_name(self, name: str | None) -> dict[str, Any]:
        """The settings of one asset/check (``{}`` when none)."""
        return dict(self.values.get(name or "", {}))

    def error(self, message: str) -> SettingsError:
        return SettingsError(f"{self.path}: {message}")


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Read and shape-check the settings file (``settings_path()`` by default).

    Raises ``SettingsError`` naming the file when it is not YAML, its top level is not a mapping, or an
    entry is not a mapping of field names (``anime_prep: 5`` instead of ``anime_prep: {limit: 5}``).
    """
    import yaml

    if path is None and settings_disabled():
        return Settings(path=Path(f"${ENV_VAR}={os.environ[ENV_VAR].strip()}"))
    target = Path(path) if path is not None else settings_path()
    if not target.exists():
        if os.environ.get(ENV_VAR, "").strip() and path is None:
            raise SettingsError(f"{target}: settings file named by ${ENV_VAR} does not exist")
        return Settings(path=target)
    try:
        data = yaml.safe_load(target.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SettingsError(f"{target}: not valid YAML: {exc}") from exc
    if data is None:
        return Settings(path=target, exists=True)
    if not isinstance(data, dict):
        raise SettingsError(f"{target}: top level must be a mapping of asset names, got {type(data).__name__}")
    values: dict[str, dict[str, Any]] = {}
    for name, entry in data.items():
        if entry is None:  # `anime_prep:` with nothing under it: no values, but the name is still checked
            values[str(name)] = {}
            continue
        if not isinstance(entry, dict):
            raise SettingsError(
                f"{target}: key {name!r} must map config field names to values "
                f"(e.g. '{name}: {{limit: 100}}'), got {type(entry).__name__}"
            )
        values[str(name)] = {str(k): v for k, v in entry.items()}
    return Settings(path=target, values=values, exists=True)


_CACHE: dict[tuple[str, float], Settings] = {}


def current_settings() -> Settings:
    """``load_settings()`` cached per (path, modification time): one read per code-location load."""
    if settings_disabled():
        return load_settings()
    target = settings_path()
    mtime = target.stat().st_mtime if target.exists() else -1.0
    key = (str(target), mtime)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_settings()
    return _CACHE[key]


def check_unknown_names(settings: Settings, known: set[str]) -> None:
    """Raise ``SettingsError`` for a top-level key that is no configurable asset/check in ``known``."""
    unknown = sorted(set(settings.values) - known)
    if unknown:
        raise settings.error(
            f"unknown key {unknown[0]!r}" + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f": not an asset or check with a config; configurable: {', '.join(sorted(known))}"
        )
