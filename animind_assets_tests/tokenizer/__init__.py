"""Tests of the tokenizer stage."""
