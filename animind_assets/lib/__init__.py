"""Plain data and ML library code. Nothing in this package may import Dagster."""
