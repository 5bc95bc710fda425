"""Shared Dagster-layer names of the llm group (artifact-store folders)."""

GROUP = "llm"
MODEL_DIR = "finetuned_model"
WORK_DIR = "finetuned_model_work"


def semantic_ids_provenance(context, asset: str) -> dict:
    """Which semantic IDs this build of ``asset`` uses, and why it is rebuilt, as metadata values.

    Reads the latest ``semantic_ids`` materialization (its data version = the ID-space hash, its
    ``id_change_reason``) and this asset's previous materialization (the ID version it was built
    on). Returns ``{"semantic_ids_version", "semantic_ids_change"}``; ``{}`` without an instance.
    """
    import dagster as dg

    try:
        sid = context.instance.get_latest_materialization_event(dg.AssetKey("semantic_ids"))
        prev = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    except Exception:  # pragma: no cover - direct invocation without an instance
        return {}
    if sid is None or sid.asset_materialization is None:
        return {}
    mat = sid.asset_materialization
    version = (mat.tags or {}).get("dagster/data_version", "")
    reason_v = mat.metadata.get("id_change_reason")
    reason = getattr(reason_v, "value", reason_v) or ""
    built_on = ""
    if prev is not None and prev.asset_materialization is not None:
        v = prev.asset_materialization.metadata.get("semantic_ids_version")
        built_on = str(getattr(v, "value", v) or "")
    if not built_on:
        change = f"first build on semantic IDs {version}"
    elif built_on == version:
        change = f"semantic IDs unchanged since the previous build ({version}); rebuilt for another reason"
    else:
        change = f"semantic IDs changed {built_on} -> {version}: {reason}"
    return {"semantic_ids_version": dg.MetadataValue.text(version), "semantic_ids_change": dg.MetadataValue.text(change)}
