"""AniMind: semantic-ID generative recommendation as a Dagster asset graph.

Layout:
  animind_assets.lib       plain data/ML library code (never imports Dagster)
  animind_assets.assets    thin Dagster assets, one module per artifact, named after it
  animind_assets.definitions  the single ``Definitions`` entry point
"""

__version__ = "0.1.0"
