"""Hierarchical item quantizers (RQ-VAE and residual k-means) in plain PyTorch.

Domain-generic: the input is an ``(n_items, dim)`` float array (one row per item, any item kind:
anime, Amazon Beauty products, ...); the output is an ``(n_items, levels)`` int64 code matrix whose
prefixes group similar items. Turn codes into unique semantic IDs with
``animind_assets.lib.semantic_ids.assign_semantic_ids``.

Public API::

    from animind_assets.lib.semantic_ids.quantizers import QuantizerConfig, preset_config, train_quantizer

    cfg = preset_config("default")      # Ward-seeded residual k-means; or "rqkmeans", "rqvae"
                                        # (TIGER-like RQ-VAE), "conservative", "aggressive"
    cfg = preset_config("rqvae", epochs=20, estimator="rotation", codebook_update="gradient")
    result = train_quantizer(vectors, cfg, log=print, on_epoch=lambda rec: ...,
                             checkpoint_dir="out/rqvae", resume=None)   # or "last" / "best" / path
    result.codes            # (n, levels) int64, row order of `vectors`
    result.metrics          # recon/commit loss, usage_l{i}, perplexity_l{i}, unique_fraction,
                            # largest_collision_group, residual_norm_l{i}, grad_norm, samples/s
    model, payload = load_quantizer("out/rqvae/model.pt")   # torch.load(weights_only=True)
    codes = encode_codes(model, new_vectors)

Components (one small module each, swappable in the spirit of GRID's modular quantizers):

* ``config``     ``QuantizerConfig`` + named ``PRESETS``
* ``kmeans``     seeded k-means (k-means++ or kNN-constrained Ward seeds + Lloyd) for codebook
                 init and RQ-KMeans
* ``modules``    input normaliser, MLP encoder/decoder, gradient estimators (STE, rotation trick)
* ``codebook``   codebook + update strategies (EMA, gradient) + windowed dead-code restarts
* ``quantizer``  residual quantizer over per-level (or one shared) codebooks
* ``model``      ``RQVAE`` and ``ResidualKMeans`` behind one interface (``codes``, ``evaluate``)
* ``trainer``    ``train_quantizer`` (split, schedule, accumulation, AMP, checkpoints, resume,
                 early stopping, dry run)
* ``checkpoint`` atomic save / ``weights_only`` load
* ``metrics``    usage, perplexity, unique fraction, collision groups
"""

from animind_assets.lib.semantic_ids.quantizers.checkpoint import load_checkpoint, load_quantizer, save_checkpoint
from animind_assets.lib.semantic_ids.quantizers.config import PRESETS, QuantizerConfig, preset_config
from animind_assets.lib.semantic_ids.quantizers.metrics import code_stats, collision_stats, perplexity_from_counts
from animind_assets.lib.semantic_ids.quantizers.trainer import BEST_NAME, LAST_NAME, QuantizerResult, encode_codes, train_quantizer

__all__ = [
    "BEST_NAME",
    "LAST_NAME",
    "PRESETS",
    "QuantizerConfig",
    "QuantizerResult",
    "code_stats",
    "collision_stats",
    "encode_codes",
    "load_checkpoint",
    "load_quantizer",
    "perplexity_from_counts",
    "preset_config",
    "save_checkpoint",
    "train_quantizer",
]
