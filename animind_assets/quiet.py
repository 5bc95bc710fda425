"""Quiet output in one place: Dagster's known beta notices everywhere; library chatter in the CLI.

1. **Known Dagster notices** (``silence_known_warnings``, every process): Dagster marks features AniMind
   relies on as beta/preview: observable source assets (the content fingerprints of the sources),
   ``AutomationCondition`` pieces, ``AssetSelection.all(include_sources=...)``,
   ``AssetsDefinition(execution_type=...)``. Each process that loads the definitions printed them again
   (the server log showed the observable-source one 90 times in 50 minutes). They carry no information
   for a user, so these three Dagster-only categories are ignored; every other warning still shows.
   Called when the definitions have loaded (``animind_assets.definitions``, so in the code server and
   every run worker) and by the CLI. It re-installs its filters when a ``warnings.catch_warnings()``
   block has dropped them (Dagster loads the asset modules inside one), and ``known_warnings_silenced`` wraps the one place where AniMind itself builds a definition with a beta
   parameter (``automation._with_check_conditions``).

2. **Library chatter in ``animind demo``** (``LibraryChatter``, CLI only, off with ``--verbose``):
   progress bars of tqdm, Hugging Face ``transformers`` ("Loading weights"), ``datasets`` ("Map") and
   ``huggingface_hub``; INFO/WARNING log lines of ``transformers``, ``trl``, ``datasets``,
   ``sentence_transformers``, ``accelerate``, ``peft``, ``torch``, ``mlflow``; and Python warnings
   (``FutureWarning``, ``DeprecationWarning``, ``UserWarning`` ... raised while the run executes). The
   warnings are not lost: they are counted, written to a file, and the summary line says how many and
   where (``--verbose`` prints them as they come). ERROR-level log records and exceptions are never
   hidden: a failing step still prints its error line. The LM benchmark commands use the same through
   ``quiet_command`` (warnings file ``<out>/library-warnings.txt``, ``--verbose`` to print).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path


def _known_categories() -> tuple[type[Warning], ...]:
    try:
        from dagster_shared.utils.warnings import BetaWarning, PreviewWarning, SupersessionWarning
    except ImportError:  # pragma: no cover - older dagster layouts
        from dagster import BetaWarning, PreviewWarning  # type: ignore[attr-defined]

        return (BetaWarning, PreviewWarning)
    return (BetaWarning, PreviewWarning, SupersessionWarning)


def _installed(category: type[Warning]) -> bool:
    return any(f[0] == "ignore" and f[1] is None and f[2] is category and f[4] == 0 for f in warnings.filters)


def silence_known_warnings() -> None:
    """Ignore Dagster's ``BetaWarning`` / ``PreviewWarning`` / ``SupersessionWarning`` (only Dagster raises
    them). Idempotent; re-installs the filters when a surrounding ``catch_warnings`` has dropped them
    (Dagster's ``load_from_defs_folder`` imports the asset modules inside one, so a filter set there is
    gone once the definitions are loaded: ``animind_assets.definitions`` calls this after the load).
    ``PYTHONWARNINGS`` cannot carry these filters: Python reads it before site-packages are importable.
    """
    for category in _known_categories():
        if not _installed(category):
            warnings.filterwarnings("ignore", category=category)


@contextlib.contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """The known Dagster notices ignored inside the block (whatever the global filters say)."""
    with warnings.catch_warnings():
        for category in _known_categories():
            warnings.simplefilter("ignore", category=category)
        yield


def dagster_console_run_config(verbose: bool) -> dict:
    """Run config (``{"loggers": ...}``) that keeps Dagster's console logger silent (CRITICAL) unless ``verbose``
    (then DEBUG: every event). Used by ``animind demo`` and the benchmark commands that call ``dg.materialize``,
    so Dagster's event lines do not interleave with their tables; a failing step still raises."""
    return {"loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "CRITICAL"}}}}


#: Environment read by the libraries when they start their progress bars / loggers. ``setdefault``: a
#: value the user exported wins.
QUIET_ENV = {
    "TQDM_DISABLE": "1",  # tqdm >= 4.66 reads TQDM_* defaults (sentence-transformers' encode bars, ...)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "ERROR",  # "Creating initial MLflow database tables..." and the like
}

#: Loggers of the libraries the pipeline drives; set to ERROR in quiet mode (their errors still print).
LIBRARY_LOGGERS = (
    "transformers",
    "trl",
    "datasets",
    "huggingface_hub",
    "sentence_transformers",
    "accelerate",
    "peft",
    "torch",
    "mlflow",
    "alembic",
    "filelock",
    "urllib3",
)


class LibraryChatter:
    """Silences the libraries' progress bars, log chatter and Python warnings for a quiet CLI run.

    ``start()`` before the libraries are imported (the env knobs are read at import time), ``stop()``
    restores ``warnings.showwarning`` and the logger levels. ``hidden`` holds the formatted warnings
    (one string each); ``write(path)`` saves them. With ``verbose=True`` it does nothing.
    """

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.hidden: list[str] = []
        self._seen: set[tuple] = set()
        self._previous_show = None
        self._levels: dict[str, int] = {}
        self._active = False
        self._tqdm_init = None  # tqdm.std.tqdm.__init__ before start() silenced bars of an already imported tqdm

    def start(self) -> LibraryChatter:
        if self.verbose or self._active:
            return self
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.ERROR)
        self._previous_show = warnings.showwarning
        warnings.showwarning = self._record  # type: ignore[assignment]
        self._active = True
        self.apply_library_switches()
        return self

    def apply_library_switches(self) -> None:
        """Call the libraries' own switches for those already imported (the env covers later imports)."""
        if self.verbose:
            return
        import sys

        if "transformers" in sys.modules:
            try:
                from transformers.utils import logging as hf_logging

                hf_logging.set_verbosity_error()
                hf_logging.disable_progress_bar()
            except Exception:  # noqa: BLE001 - a missing switch only means more output
                pass
        if "tqdm" in sys.modules and self._tqdm_init is None:
            # tqdm reads TQDM_DISABLE when it is imported: a command that imported it before start() (e.g. through
            # transformers while parsing its flags) would still draw bars, such as GGUF's "Converting and de-quantizing"
            import tqdm.std

            original = tqdm.std.tqdm.__init__

            def quiet_init(bar, *args, **kwargs):
                if len(args) < 10:  # `disable` is the 11th positional parameter of tqdm()
                    kwargs["disable"] = True
                original(bar, *args, **kwargs)

            self._tqdm_init = original
            tqdm.std.tqdm.__init__ = quiet_init
        if "datasets" in sys.modules:
            try:
                import datasets

                datasets.disable_progress_bars()
                datasets.logging.set_verbosity_error()
            except Exception:  # noqa: BLE001
                pass

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        key = (str(message), category, filename, lineno)
        if key in self._seen:
            return
        self._seen.add(key)
        self.hidden.append(warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    def stop(self) -> None:
        if not self._active:
            return
        if self._previous_show is not None and warnings.showwarning == self._record:
            warnings.showwarning = self._previous_show
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        if self._tqdm_init is not None:
            import tqdm.std

            tqdm.std.tqdm.__init__ = self._tqdm_init
            self._tqdm_init = None
        self._active = False

    def write(self, path: Path) -> Path | None:
        """Save the hidden warnings to ``path`` (None when there were none)."""
        if not self.hidden:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(self.hidden) + "\n", encoding="utf-8")
        return path

    def __enter__(self) -> LibraryChatter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def quiet_command(verbose: bool, warnings_file: Path) -> Iterator[LibraryChatter]:
    """``LibraryChatter`` around a benchmark command (``python -m animind_assets.benchmarks.beauty_llm``, ...), as
    ``animind demo`` does: the command's own progress and result lines print; the libraries' progress bars
    ("Loading weights"), INFO/WARNING log lines and Python warnings are held back. On exit the held warnings are
    written to ``warnings_file`` and one line names it and their count. ``verbose=True`` changes nothing.
    Nested use (a command calling another command's ``main``) is safe: the inner block leaves the outer one active.
    """
    if _ACTIVE and not verbose:
        yield _ACTIVE[-1]
        return
    chatter = LibraryChatter(verbose=verbose).start()
    _ACTIVE.append(chatter)
    try:
        yield chatter
    finally:
        _ACTIVE.remove(chatter)
        chatter.stop()
        path = chatter.write(warnings_file)
        if path is not None:
            print(f"{len(chatter.hidden)} library warning(s) held back: {path} (--verbose prints them as they come)",
                  flush=True)


_ACTIVE: list[LibraryChatter] = []

#: ``--verbose`` of the commands that use ``quiet_command``.
VERBOSE_HELP = ("also print the libraries' progress bars, log lines and warnings (held back by default and written to "
                "<out>/library-warnings.txt)")
