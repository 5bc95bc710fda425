"""Dagster definitions of the `llm` asset group (thin: load inputs, call animind_assets.lib, return data + metadata)."""
