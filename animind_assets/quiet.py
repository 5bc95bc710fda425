"""Known, understood Dagster warnings silenced once per process (CLI, code server, run workers).

Dagster marks features AniMind relies on as beta/preview: observable source assets (the content
fingerprints of the sources), ``AutomationCondition`` pieces, ``AssetSelection.all(include_sources=...)``,
``AssetsDefinition(execution_type=...)``. Each process that loads the definitions printed those
warnings again (the server log showed the observable-source one 90 times in 50 minutes). They carry no
information for a user, so ``silence_known_warnings`` filters these three categories (only Dagster raises
them); every other warning still shows. Called when the definitions load (``animind_assets.defs``, so in
the code server and every run worker) and by the CLI.
"""

from __future__ import annotations

import warnings

_DONE = False


def silence_known_warnings() -> None:
    """Ignore Dagster's ``BetaWarning`` / ``PreviewWarning`` / ``SupersessionWarning``. Idempotent."""
    global _DONE
    if _DONE:
        return
    try:
        from dagster_shared.utils.warnings import BetaWarning, PreviewWarning, SupersessionWarning
    except ImportError:  # pragma: no cover - older dagster layouts
        from dagster import BetaWarning, PreviewWarning  # type: ignore[attr-defined]

        SupersessionWarning = None  # type: ignore[assignment]
    for category in (BetaWarning, PreviewWarning, SupersessionWarning):
        if category is not None:
            warnings.filterwarnings("ignore", category=category)
    _DONE = True
