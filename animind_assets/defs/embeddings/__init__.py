"""Dagster definitions of the `embeddings` asset group (thin: load inputs, call animind_assets.lib, return data + metadata)."""
