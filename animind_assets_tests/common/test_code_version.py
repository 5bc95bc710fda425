"""code_version follows the code: a library edit changes exactly the assets whose code reaches it."""

from animind_assets import code_version as cv


def _versions(sources=None):
    from animind_assets.definitions import all_assets

    out = {}
    for a in all_assets:
        module = cv.defining_module(a)
        if isinstance(getattr(a, "is_materializable", None), bool) and a.is_materializable and module:
            for key in a.keys:
                out[key.to_user_string()] = cv.code_version_for_module(module, sources)
    return out


def test_every_asset_has_a_content_code_version():
    from animind_assets.definitions import defs

    graph = defs.get_repository_def().asset_graph
    versions = {k.to_user_string(): graph.get(k).code_version for k in graph.materializable_asset_keys}
    assert versions and all(v and len(v) == 12 and v != "1" for v in versions.values()), versions
    assert versions == _versions()


def test_library_edit_marks_exactly_the_dependent_assets():
    before = _versions()
    mod = "animind_assets.lib.semantic_ids.quantizers.kmeans"
    edited = {mod: cv.module_path(mod).read_bytes() + b"\n# edited\n"}
    after = _versions(edited)
    changed = {k for k in before if before[k] != after[k]}
    expected = {k for k in before if any(mod in cv.closure(cv.defining_module(a)) for a in _assets_for(k))}
    assert changed == expected
    assert "rqvae_model" in changed and "semantic_ids" in changed
    assert "anime_prep" not in changed and "anime_embeddings" not in changed


def test_support_modules_do_not_change_versions():
    before = _versions()
    edited = {"animind_assets.meta": cv.module_path("animind_assets.meta").read_bytes() + b"\n# edited\n"}
    assert _versions(edited) == before


def _assets_for(key):
    from animind_assets.definitions import all_assets

    return [a for a in all_assets if getattr(a, "is_materializable", False) and key in {k.to_user_string() for k in a.keys}]
