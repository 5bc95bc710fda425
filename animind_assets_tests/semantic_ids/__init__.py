"""Tests of the semantic_ids stage."""
