"""The Dagster layer, loaded with ``dg.load_from_defs_folder``: one sub-package per asset group."""
