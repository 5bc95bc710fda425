"""Semantic IDs: quantizers (RQ-VAE, RQ-KMeans) in ``quantizers``, code assignment and disambiguation in
``assign``, quality reports in ``evaluation``, the prefix trie in ``trie``. Never imports Dagster."""
