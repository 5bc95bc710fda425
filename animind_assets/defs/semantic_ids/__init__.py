"""Dagster definitions of the `semantic_ids` asset group (thin: load inputs, call animind_assets.lib, return data + metadata)."""
