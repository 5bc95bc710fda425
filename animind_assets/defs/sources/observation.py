"""Shared observation of a raw source read: data version = content fingerprint, plus metadata."""

import dagster as dg

from animind_assets.resources import AnimeSource


def observe(context: dg.AssetExecutionContext, anime_source: AnimeSource, raw, what: str) -> dg.ObserveResult:
    """``ObserveResult`` for a ``RawCatalog`` / ``RawInteractions`` read by ``anime_source``."""
    fingerprint = raw.fingerprint()
    context.log.info(f"observed {what} {raw.origin}: {raw.rows_read} rows, fingerprint {fingerprint}")
    for report in raw.reports:
        context.log.info(report.summary())
    metadata = {
        "source": dg.MetadataValue.text(anime_source.describe()),
        "origin": dg.MetadataValue.text(raw.origin),
        "dagster/row_count": dg.MetadataValue.int(raw.rows_read),
        "rows_quarantined_on_read": dg.MetadataValue.int(raw.rejected.height),
        "read_report": dg.MetadataValue.md("\n\n".join(r.summary() for r in raw.reports) or "(none)"),
        "fingerprint": dg.MetadataValue.text(fingerprint),
    }
    if hasattr(raw, "simulated"):
        metadata["simulated"] = dg.MetadataValue.bool(bool(raw.simulated))
    return dg.ObserveResult(data_version=dg.DataVersion(fingerprint), metadata=metadata)
