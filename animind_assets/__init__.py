"""AniMind: semantic-ID generative recommendation as a Dagster asset graph.

Layout:
  animind_assets.lib       plain data/ML library code (never imports Dagster)
  animind_assets.defs      thin Dagster layer, one package per asset group (loaded by load_from_defs_folder)
  animind_assets.definitions  the single ``Definitions`` entry point
"""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that spin-wait fight each other on small shared CPUs (6-10x slower training measured
# on the 2-core dev box); passive waiting must be chosen before torch loads its OpenMP runtime.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
