"""Causal LM with semantic-ID tokens: dataset building (``data``), fine-tuning (``finetune``), inference
(``infer``) and evaluation (``evaluation``). Inference never imports training code. Never imports Dagster."""
