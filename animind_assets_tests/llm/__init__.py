"""Tests of the llm stage."""
