"""The Dagster layer, loaded with ``dg.load_from_defs_folder``: one sub-package per asset group."""

from animind_assets.quiet import silence_known_warnings as _silence

_silence()  # for direct imports of the asset modules; animind_assets.definitions re-applies it after the load
