"""Tests of the embeddings stage."""
