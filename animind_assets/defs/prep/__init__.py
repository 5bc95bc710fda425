"""Dagster definitions of the `prep` asset group (thin: load inputs, call animind_assets.lib, return data + metadata)."""
