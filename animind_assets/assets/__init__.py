"""Dagster assets, one module per artifact, named after it. Auto-discovered by ``definitions.py``."""
