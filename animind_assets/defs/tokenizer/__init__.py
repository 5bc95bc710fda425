"""Dagster definitions of the `tokenizer` asset group (thin: load inputs, call animind_assets.lib, return data + metadata)."""
