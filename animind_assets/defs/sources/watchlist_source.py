"""Observable source: user watch lists. Data version = content fingerprint of the rows as read."""

import dagster as dg

from animind_assets.defs.sources.observation import observe
from animind_assets.resources import AnimeSource


@dg.observable_source_asset(
    group_name="sources",
    description="Source user watch lists (simulated in the demo); data version = content fingerprint.",
)
def watchlist_source(context: dg.AssetExecutionContext, anime_source: AnimeSource) -> dg.ObserveResult:
    return observe(context, anime_source, anime_source.read_interactions(), "watch lists")
