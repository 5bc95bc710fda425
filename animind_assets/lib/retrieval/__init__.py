"""Generative retrieval and sequential recommenders on Amazon Beauty. Never imports Dagster.

Modules: ``tiger`` (TIGER, Rajput et al. 2023), ``evaluation`` (the one leave-one-out evaluation: full
ranking, Recall/NDCG@K, bootstrap intervals, with and without masking of seen items; popularity
baseline), ``seqtrain`` (shared training loop for next-item models over all prefixes of the training
sequences), ``sasrec`` (SASRec, Kang & McAuley 2018), ``pq`` (product-quantization semantic IDs),
``rpg`` (RPG, Hou et al. KDD 2025).
"""
