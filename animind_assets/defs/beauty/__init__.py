"""Dagster definitions of the `beauty` asset group (thin: load inputs, call animind_assets.lib, return data + metadata)."""
