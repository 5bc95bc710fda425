"""Tests of the ops stage."""
