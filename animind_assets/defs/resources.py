"""AniMind's resources, declared once (see ``animind_assets.resources.build_resources``)."""

import dagster as dg

from animind_assets.resources import build_resources


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=build_resources())
