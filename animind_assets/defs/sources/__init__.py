"""Dagster definitions of the `sources` asset group (thin: load inputs, call animind_assets.lib, return data + metadata)."""
