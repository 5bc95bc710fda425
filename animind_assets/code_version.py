"""``code_version`` that follows the code: one content hash per asset.

An asset's code version is the SHA-256 (first 12 hex digits) of the source of the module that defines it
plus every ``animind_assets`` module it imports, transitively (found statically with ``ast``, including
imports inside functions). Dagster-support modules that do not change what an asset computes
(``animind_assets.resources``, ``meta``, ``gpu``, ``automation``, ``definitions``, ``code_version``) are left
out, so a change to a library module marks exactly the assets whose code reaches it stale, and automation's
"code changed" condition fires for them and only them.

Pure Python, no Dagster import; ``definitions.py`` applies it to every asset.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "animind_assets"
PACKAGE_ROOT = Path(__file__).resolve().parent

#: modules whose changes never change an asset's output (orchestration, storage plumbing, metadata rendering)
EXCLUDED = frozenset(
    {
        f"{PACKAGE}",
        f"{PACKAGE}.resources",
        f"{PACKAGE}.meta",
        f"{PACKAGE}.gpu",
        f"{PACKAGE}.automation",
        f"{PACKAGE}.definitions",
        f"{PACKAGE}.code_version",
        f"{PACKAGE}.settings",
    }
)


def _excluded(module: str) -> bool:
    return module in EXCLUDED or any(module.startswith(e + ".") for e in EXCLUDED if e != PACKAGE)


def module_path(module: str) -> Path | None:
    """Source file of an ``animind_assets`` module (package ``__init__.py`` for packages), else ``None``."""
    if not (module == PACKAGE or module.startswith(PACKAGE + ".")):
        return None
    rel = module.split(".")[1:]
    base = PACKAGE_ROOT.joinpath(*rel)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _resolve(current: str, node: ast.ImportFrom) -> list[str]:
    if node.level:
        parts = current.split(".")
        is_pkg = module_path(current) is not None and module_path(current).name == "__init__.py"
        base = parts if is_pkg else parts[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    # `from pkg import name` may import a sub-module `pkg.name`
    return [mod] + [f"{mod}.{a.name}" for a in node.names]


def direct_imports(module: str) -> set[str]:
    """``animind_assets`` modules imported anywhere in ``module``'s source (module-level or inside functions)."""
    path = module_path(module)
    if path is None:
        return set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _resolve(module, node)
        else:
            continue
        for name in names:
            # importing a.b.c also runs a.b's and a's __init__; keep the package inits that are ours
            parts = name.split(".")
            for i in range(2, len(parts) + 1):
                cand = ".".join(parts[:i])
                if module_path(cand) is not None:
                    found.add(cand)
    found.discard(module)
    return found


@lru_cache(maxsize=None)
def closure(module: str) -> frozenset[str]:
    """``module`` plus every ``animind_assets`` module it reaches, minus ``EXCLUDED``."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen or module_path(m) is None:
            continue
        seen.add(m)
        todo.extend(direct_imports(m) - seen)
    return frozenset(m for m in seen if not _excluded(m) or m == module)


def code_version_for_module(module: str, sources: dict[str, bytes] | None = None) -> str:
    """Hash of the sources of ``closure(module)``.

    ``sources`` optionally overrides file contents by module name (tests use it to simulate an edit).
    Returns 12 hex digits. Raises ``ValueError`` for a module outside ``animind_assets``.
    """
    if module_path(module) is None:
        raise ValueError(f"{module!r} is not a module of {PACKAGE}")
    h = hashlib.sha256()
    for m in sorted(closure(module)):
        data = (sources or {}).get(m)
        if data is None:
            data = module_path(m).read_bytes()
        h.update(m.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:12]


def defining_module(obj) -> str | None:
    """Module of the function that computes a Dagster ``AssetsDefinition`` (``None`` when unknown)."""
    node = getattr(obj, "node_def", None)
    fn = getattr(node, "compute_fn", None)
    fn = getattr(fn, "decorated_fn", fn)
    return getattr(fn, "__module__", None)
