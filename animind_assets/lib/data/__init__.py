"""Data sources and cleaning: MAL adapters (SQLite, Kaggle CSV, demo), catalog/interaction cleaning,
Amazon Beauty readers. Never imports Dagster."""
