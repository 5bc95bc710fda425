"""SentencePiece domain tokenizer with semantic-ID symbols. Never imports Dagster."""
