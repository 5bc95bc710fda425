"""The single Dagster ``Definitions`` entry point of AniMind (``dg dev`` / ``dagster dev`` load it).

Everything under ``animind_assets/defs/`` (one sub-package per asset group, plus ``resources.py``) is
discovered with ``dg.load_from_defs_folder``; the automation layer (``animind_assets.automation``:
declarative conditions, observation and rebuild schedules, the failure alert, the executor) is then
applied to the loaded assets in one place.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from animind_assets import automation, code_version, launchpad, quiet
from animind_assets.resources import build_resources

__all__ = ["all_assets", "all_checks", "build_resources", "defs"]


def with_code_version(obj):
    """Give every materializable asset the content hash of the code that computes it (``code_version.py``)."""
    module = code_version.defining_module(obj)
    if not isinstance(obj, dg.AssetsDefinition) or not obj.is_materializable or module is None:
        return obj
    version = code_version.code_version_for_module(module)
    return dg.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version), [obj])[0]


def _build() -> tuple[list, list, dg.Definitions]:
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)
    launchpad.check_settings()  # animind.yaml: every key names a configurable asset/check
    assets = [with_code_version(a) for a in (loaded.assets or [])]
    auto = automation.definitions_kwargs(assets, include_assets=True, checks=list(loaded.asset_checks or []))
    checks = auto.pop("asset_checks")
    return assets, checks, dg.Definitions(
        assets=auto.pop("assets"),
        asset_checks=checks,
        resources=dict(loaded.resources or {}),
        jobs=[*(loaded.jobs or []), *auto.pop("jobs", [])],
        schedules=[*(loaded.schedules or []), *auto.pop("schedules", [])],
        sensors=[*(loaded.sensors or []), *auto.pop("sensors", [])],
        **auto,
    )


all_assets, all_checks, defs = _build()
# after the load: load_from_defs_folder imports the asset modules inside a catch_warnings block, which
# drops a filter set there (every process that loads the code location - code server, run and step
# workers - runs this line)
quiet.silence_known_warnings()
