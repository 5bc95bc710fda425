"""Tests of the retrieval stage."""
