"""Shared Dagster-layer pieces of the beauty group: the group name, the Amazon source config (shared
by ``beauty_items`` and ``beauty_interactions``), the TIGER ID-source partitions."""

from typing import Optional

import dagster as dg
from pydantic import Field

from animind_assets.lib.data.amazon import AmazonData, load_raw_amazon
from animind_assets.lib.data.amazon_split import load_prepared_split
from animind_assets.meta import counts_md, scalar_metadata

GROUP = "beauty"


class AmazonSourceConfig(dg.Config):
    source: str = Field("prepared", description="'prepared' (shared TIGER/P5 split folder) | 'raw' (Amazon review + metadata files)")
    prepared_dir: str = Field("", description="prepared split folder; '' = ../shared/data/beauty (or $ANIMIND_SHARED_DATA/beauty)")
    order: str = Field(
        "inter_json",
        description="prepared split: sequence order, 'inter_json' (tiger-cf, default) | 'user_sequence' (P5); "
        "they differ for ~73% of users (same-day ties)",
    )
    reviews_path: str = Field("", description="raw: 5-core reviews file (JSON or Python-dict lines, .gz or plain)")
    metadata_path: Optional[str] = Field(None, description="raw: metadata file (JSON or Python-dict lines, .gz or plain)")
    record_format: str = Field("auto", description="raw: 'auto' (JSON, else Python literal) | 'json' | 'python'")
    max_description_chars: int = Field(0, description="raw: description characters appended to the item text (0 = none)")

    def load(self) -> AmazonData:
        if self.source == "prepared":
            return load_prepared_split(self.prepared_dir or None, order=self.order)
        if self.source == "raw":
            if not self.reviews_path:
                raise ValueError("AmazonSourceConfig: source='raw' needs reviews_path")
            return load_raw_amazon(self.reviews_path, self.metadata_path, fmt=self.record_format, max_description_chars=self.max_description_chars)
        raise ValueError(f"AmazonSourceConfig.source={self.source!r}; expected 'prepared' or 'raw'")


def source_metadata(data: AmazonData) -> dict:
    md = {
        "source_origin": dg.MetadataValue.text(data.origin),
        "sequence_order": dg.MetadataValue.text(data.order),
        "has_timestamps": dg.MetadataValue.bool(data.has_timestamps),
        "dropped_by_reason": counts_md(data.dropped),
        "cleaned_values": counts_md(data.cleaned_values, key="file: column:reason", value="values set to null"),
        "dropped_lines": dg.MetadataValue.json({k: v for k, v in data.examples.items()}),
        **scalar_metadata(data.notes, prefix="source_"),
    }
    for i, rep in enumerate(data.reports):
        name = "reviews_file" if i == 0 else "metadata_file"
        md[f"{name}_parse"] = dg.MetadataValue.text(rep.summary())
        md[f"{name}_bad_lines"] = dg.MetadataValue.int(rep.bad)
    return md

TIGER_MODEL_ASSET = "tiger_model"
ID_SOURCES = ("own", "reference", "collaborative")


def split_from_interactions(interactions, n_items: int | None = None):
    """``beauty_interactions`` frame -> (``SequenceSplit``, data fingerprint) for the sequence models
    (``n_items`` default: largest item id + 1)."""
    from animind_assets.lib.common.fingerprint import frame_fingerprint
    from animind_assets.lib.data.amazon import sequences_from_interactions
    from animind_assets.lib.retrieval.evaluation import SequenceSplit

    if n_items is None:
        n_items = int(interactions["item_id"].max()) + 1 if interactions.height else 0
    split = SequenceSplit.from_sequences(sequences_from_interactions(interactions), n_items=n_items)
    fp = frame_fingerprint(interactions.select(["user_id", "item_id", "seq"]), sort_by=["user_id", "seq"])
    return split, fp


def curve_metadata(history: list, title: str) -> dict:
    """Validation table + plot of a ``SeqTrainResult.history`` for asset metadata."""
    import polars as pl

    from animind_assets.lib.common.plots import lines_png
    from animind_assets.meta import image_md, markdown_table

    if not history:
        return {}
    with_nll = "val_nll" in history[0]  # early_stop_metric="nll"
    cols = ["epoch", "train_loss", "val_recall@10", "val_ndcg@10", *(["val_nll"] if with_nll else []), "positions_per_s",
            "elapsed_s"]
    md = {"history": dg.MetadataValue.md(markdown_table(pl.DataFrame(history).select(cols), max_rows=40))}
    if len(history) > 1:
        md["validation_curve"] = image_md(lines_png({"val Recall@10": [h["val_recall@10"] for h in history],
                                                     "val NDCG@10": [h["val_ndcg@10"] for h in history]},
                                                    f"{title}: validation (seen items masked)", xlabel="validation", ylabel="metric"),
                                          "Validation")
        losses = {"train loss": [h["train_loss"] for h in history]}
        if with_nll:
            losses["val NLL (held-out item)"] = [h["val_nll"] for h in history]
        md["loss_curve"] = image_md(lines_png(losses, f"{title}: train loss" + (" and validation NLL" if with_nll else ""),
                                              xlabel="validation", ylabel="nats"), "Loss")
    return md


def load_sasrec_asset(artifacts, needed_by: str, data_fp: str | None = None):
    """The materialized ``sasrec_model`` (eval mode) and its ``extra`` for an asset that builds on it (PQ codes,
    collaborative TIGER IDs, the RPG distillation teacher). ``needed_by`` names the asset and setting in the
    error. With ``data_fp``, a SASRec trained on other interactions is refused. Raises ``FileNotFoundError``
    (not materialized: says what to materialize) or ``ValueError`` (fingerprint differs)."""
    from animind_assets.lib.retrieval.sasrec import load_sasrec

    folder = artifacts.store().path("sasrec_model", "model")
    try:
        model, extra = load_sasrec(str(folder))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{needed_by} needs sasrec_model ({exc}): materialize sasrec_model first") from exc
    if data_fp is not None and extra.get("data_fingerprint") not in (None, data_fp):
        raise ValueError(f"{needed_by}: sasrec_model ({folder}) was trained on other interactions than beauty_interactions: "
                         "rematerialize sasrec_model first")
    return model, extra
