"""One config source per stage: every launchpad config is derived from its library config."""

import dataclasses

import pytest

from animind_assets.launchpad import DEMO_OVERRIDES


def _derived_configs():
    from animind_assets.defs.beauty.tiger_model import TigerModelConfig
    from animind_assets.defs.embeddings.config import AnimeEmbeddingsConfig
    from animind_assets.defs.llm.finetuned_model import FinetunedModelConfig
    from animind_assets.defs.llm.llm_prep_dataset import LlmPrepDatasetConfig
    from animind_assets.defs.llm.recommendation_eval import RecommendationEvalConfig
    from animind_assets.defs.semantic_ids.quantizer_fit import QuantizerOverrides
    from animind_assets.defs.tokenizer.domain_tokenizer import DomainTokenizerAssetConfig

    from animind_assets.defs.beauty.beauty_finetuned_model import BeautyFinetunedModelConfig
    from animind_assets.defs.beauty.beauty_llm_eval import BeautyLlmEvalConfig
    from animind_assets.defs.beauty.beauty_llm_prep_dataset import BeautyLlmPrepDatasetConfig
    from animind_assets.defs.beauty.rpg_model import RpgModelConfig
    from animind_assets.defs.beauty.sasrec_model import SasrecModelConfig

    return {
        "beauty_finetuned_model": BeautyFinetunedModelConfig,
        "beauty_llm_eval": BeautyLlmEvalConfig,
        "beauty_llm_prep_dataset": BeautyLlmPrepDatasetConfig,
        "rpg_model": RpgModelConfig,
        "sasrec_model": SasrecModelConfig,
        "tiger_model": TigerModelConfig,
        "anime_embeddings": AnimeEmbeddingsConfig,
        "finetuned_model": FinetunedModelConfig,
        "llm_prep_dataset": LlmPrepDatasetConfig,
        "recommendation_eval": RecommendationEvalConfig,
        "rqvae_model": QuantizerOverrides,
        "domain_tokenizer": DomainTokenizerAssetConfig,
    }


def _lib_default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@pytest.mark.parametrize("asset", sorted(_derived_configs()))
def test_launchpad_fields_equal_library_fields(asset):
    cls = _derived_configs()[asset]
    lib = cls.LIB_CLASS
    nested = getattr(cls, "NESTED_FIELDS", {})
    lib_fields = {f.name: f for f in dataclasses.fields(lib) if f.init and f.name not in nested}
    assert set(cls.LIB_FIELDS) == set(lib_fields), "every library knob must be in the launchpad"
    lib_instance = lib()
    for outer, names in nested.items():
        inner = getattr(lib_instance, outer)
        assert set(names) == {f.name for f in dataclasses.fields(inner) if f.init}
        for name in names:
            expected = DEMO_OVERRIDES.get(asset, {}).get(name, getattr(inner, name))
            got = getattr(cls(), name)
            assert (tuple(got) if isinstance(expected, tuple) else got) == expected, f"{asset}.{outer}.{name}"
    assert set(lib_fields) <= set(cls.model_fields)
    instance = cls()
    for name, f in lib_fields.items():
        value = getattr(instance, name)
        if asset == "rqvae_model":
            assert value is None  # preset + overrides: None = the preset's value
            continue
        expected = DEMO_OVERRIDES.get(asset, {}).get(name, _lib_default(f))
        assert value == expected, f"{asset}.{name}: launchpad default {value!r} != library {expected!r}"
        assert cls.model_fields[name].description, f"{asset}.{name} has no description"
    # the launchpad's defaults build the library config with the same values
    built = instance.to_lib()
    assert isinstance(built, lib)


def test_demo_overrides_name_real_fields():
    configs = _derived_configs()
    for asset, over in DEMO_OVERRIDES.items():
        assert asset in configs
        known = set(configs[asset].LIB_FIELDS) | {n for names in getattr(configs[asset], "NESTED_FIELDS", {}).values() for n in names}
        assert set(over) <= known
