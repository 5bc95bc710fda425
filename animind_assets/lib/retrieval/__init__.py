"""Generative retrieval and sequential recommenders on Amazon Beauty (TIGER). Never imports Dagster."""
