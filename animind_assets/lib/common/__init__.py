"""Helpers shared by every stage: progress logging, plots, atomic storage, fingerprints, ranking metrics,
device choice and safe checkpoint loading. Never imports Dagster."""
