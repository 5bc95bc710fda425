"""Synthetic inputs and tiny models for the ``test_llm_*`` tests (imported by them; not a test file).

* ``make_catalog`` / ``make_interactions`` / ``make_semantic_ids``: a small anime catalog with
  missing English names, years and studios, users with scores, a dropped entry, a duplicate
  (user, anime) row, and unique semantic IDs with structured fake codebooks.
* ``smollm2_tokenizer()``: the SmolLM2 tokenizer loaded offline from the embedded GGUF, loaded once
  per process (3-4 s) and deep-copied for each user.
* ``tiny_llama(tokenizer)``: a 2-block LlamaConfig model (hidden 64) sized to the tokenizer.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import polars as pl

from animind_assets.lib.semantic_ids.assign import assign_semantic_ids, semantic_id_strings

GENRES = ["Action", "Comedy", "Drama", "Romance", "Sci-Fi", "Slice of Life", "Mecha", "Sports"]
STUDIOS = ["Sunrise", "Madhouse", "Bones", "Kyoto Animation", "Production I.G"]
FIRST_TITLES = {1: ("Cowboy Bebop", "Cowboy Bebop"), 2: ("Toraigan", "Trigun"), 3: ("Shingeki no Kyojin", None)}


def make_catalog(n: int = 40, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        name, en = FIRST_TITLES.get(i, (f"Anime Title {i}", f"English Title {i}" if i % 3 else None))
        g = sorted(set(rng.choice(GENRES, size=int(rng.integers(1, 4)), replace=False).tolist()))
        studios = [] if i % 7 == 0 else [STUDIOS[i % len(STUDIOS)]]
        year = None if i % 5 == 0 else int(1990 + (i * 3) % 30)
        rows.append(
            {
                "anime_id": i,
                "name": name,
                "english_name": en,
                "title": en or name,
                "genres": g,
                "synopsis": None if i % 6 == 0 else f"Story number {i} about {g[0].lower()} and friends.",
                "type": "TV" if i % 4 else "Movie",
                "episodes": 12,
                "year": year,
                "premiered": None,
                "studios": studios,
                "source": "Manga" if i % 2 else "Original",
                "rating": "PG-13",
                "score": 7.0,
                "members": 1000 * (n - i + 1),
                "has_synopsis": i % 6 != 0,
                "missing_core_fields": [],
                "anime_text": f"Title: {name}.",
            }
        )
    return pl.DataFrame(rows)


def make_interactions(n_users: int = 30, n_anime: int = 40, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        k = int(rng.integers(3, 12)) if u != 1 else 8
        items = rng.choice(np.arange(1, n_anime + 1), size=k, replace=False).tolist()
        for seq, a in enumerate(items):
            score = int(rng.choice([0, 2, 5, 7, 9]))
            status = 4 if (u == 2 and seq == 0) else 2
            rows.append({"user_id": u, "anime_id": int(a), "score": score, "status": status, "watched_episodes": 12, "seq": seq})
    rows.append({**rows[0], "seq": 99})  # duplicate (user, anime) pair: counted and dropped
    return pl.DataFrame(rows)


def make_codebooks(levels: int = 3, size: int = 8, dim: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(size, dim)).astype(np.float32) for _ in range(levels)]


def make_semantic_ids(catalog: pl.DataFrame, levels: int = 3, size: int = 8, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ids = catalog["anime_id"].to_numpy()
    codes = rng.integers(0, size, size=(len(ids), levels))
    codes[1] = codes[2]  # force a collision: the disambiguation level separates them
    full = assign_semantic_ids(codes, order_key=ids)
    return pl.DataFrame(
        {"anime_id": ids, "codes": full.tolist(), "semantic_id": semantic_id_strings(full)},
        schema={"anime_id": pl.Int64, "codes": pl.List(pl.Int64), "semantic_id": pl.Utf8},
    )


@functools.lru_cache(maxsize=1)
def _tokenizer_once():
    from animind_assets.lib.llm.finetune import load_tokenizer

    return load_tokenizer()


def smollm2_tokenizer():
    """A fresh copy of the offline SmolLM2 tokenizer (the GGUF is parsed once per process)."""
    return copy.deepcopy(_tokenizer_once())


def tiny_llama(tokenizer, seed: int = 0, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def tiny_finetune_config(**over):
    from animind_assets.lib.llm.finetune import FinetuneConfig

    base = dict(phase1_max_steps=2, phase2_max_steps=2, batch_size=4, max_seq_length=256, eval_examples=4,
                num_threads=1, english_ppl=True, ppl_max_tokens=32)
    base.update(over)
    return FinetuneConfig(**base)


def build_tiny_model_folder(dest, phase_steps: int = 1, **data_over):
    """Dataset + tiny fine-tuned model folder (as ``finetuned_model`` writes it); ``data_over``: LlmDataConfig
    overrides (e.g. ``next_id_format="sequence"``). Returns (folder, dataset frame, interactions, catalog,
    semantic_ids)."""
    from pathlib import Path

    from animind_assets.lib.llm.data import LlmDataConfig, build_llm_dataset, sid_lookup_frame
    from animind_assets.lib.llm.finetune import run_finetune, save_model_folder

    dest = Path(dest)
    cat = make_catalog()
    inter = make_interactions()
    sids = make_semantic_ids(cat)
    frame = build_llm_dataset(cat, inter, sids, LlmDataConfig(n_examples=300, validation_user_frac=0.2, test_user_frac=0.2, **data_over)).frame
    lookup = sid_lookup_frame(cat, sids)
    tok = smollm2_tokenizer()
    cfg = tiny_finetune_config(phase1_max_steps=phase_steps, phase2_max_steps=phase_steps, english_ppl=False)
    res = run_finetune(frame, lookup, cfg, dest / "work", codebooks=make_codebooks(), base=(tiny_llama(tok), tok))
    folder = dest / "finetuned_model"
    folder.mkdir(parents=True, exist_ok=True)
    save_model_folder(res, lookup, folder)
    return folder, frame, inter, cat, sids
