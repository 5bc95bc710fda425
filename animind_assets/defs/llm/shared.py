"""Shared Dagster-layer names of the llm group (artifact-store folders)."""

GROUP = "llm"
MODEL_DIR = "finetuned_model"
WORK_DIR = "finetuned_model_work"
