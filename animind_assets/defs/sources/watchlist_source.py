"""Observable source: user watch lists. Data version = content fingerprint of the rows as read."""

import dagster as dg

from animind_assets.resources import AnimeSource


@dg.observable_source_asset(
    group_name="sources",
    description="Source user watch lists (simulated in the demo); data version = content fingerprint.",
)
def watchlist_source(context: dg.AssetExecutionContext, anime_source: AnimeSource) -> dg.ObserveResult:
    raw = anime_source.read_interactions()
    fingerprint = raw.fingerprint()
    context.log.info(f"observed watch lists {raw.origin}: {raw.frame.height} rows, fingerprint {fingerprint}")
    return dg.ObserveResult(
        data_version=dg.DataVersion(fingerprint),
        metadata={
            "source": dg.MetadataValue.text(anime_source.describe()),
            "origin": dg.MetadataValue.text(raw.origin),
            "rows": dg.MetadataValue.int(raw.frame.height),
            "simulated": dg.MetadataValue.bool(raw.simulated),
            "fingerprint": dg.MetadataValue.text(fingerprint),
        },
    )
