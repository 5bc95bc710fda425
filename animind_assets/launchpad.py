"""Launchpad configs derived from the library configs: one definition per stage.

``derive_config(LibConfig, ...)`` builds a ``dagster.Config`` subclass whose fields are exactly the library
dataclass's fields (same names, types and defaults; descriptions from the library field's trailing
``# comment`` or ``metadata["description"]``), plus the asset-only fields passed in ``extra``. The Dagster
class gets ``to_lib()`` returning the library config, so every library knob shows in the launchpad with the
library's default and nothing is copied by hand.

Deliberate demo-scale overrides of library defaults are listed in one place, ``DEMO_OVERRIDES``, and a test
asserts field sets and defaults match everywhere else.

The project settings file (``animind.yaml``, see ``animind_assets.settings``) comes last: its values replace
the defaults of the named asset's config when the code location loads (``apply_settings``; ``derive_config``
applies it for ``asset=``, hand-written configs use the ``@settings_defaults("<asset>")`` class decorator).
So the launchpad shows them pre-filled and runs without config (automation, schedules) use them. Every
settings-applied class keeps the untouched class as ``BUILTIN`` (for subclasses of another asset's config).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any

import dagster as dg
from pydantic import Field, TypeAdapter, ValidationError, create_model

from animind_assets.settings import Settings, check_unknown_names, current_settings

#: asset name -> {field: default used in the launchpad instead of the library default} (why: bounded CPU runs)
DEMO_OVERRIDES: dict[str, dict[str, Any]] = {
    "finetuned_model": {"train_layers": 4, "phase1_max_steps": 6, "phase2_max_steps": 12},
    "beauty_finetuned_model": {"train_layers": 4, "phase1_max_steps": 6, "phase2_max_steps": 12},
    # Beauty sequence models: validation NDCG@10 on a fixed 5,000-user subset (of 22,363) per epoch
    "sasrec_model": {"val_users": 5000},
    "rpg_model": {"val_users": 5000},
}


def field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comments`` of a dataclass's field lines, by field name ({} when the source is unavailable)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    current_line_name: dict[int, str] = {}
    for line_no, line in enumerate(src.splitlines(), 1):
        stripped = line.strip()
        head = stripped.split(":", 1)[0].strip()
        if head in names and line.startswith("    ") and not line.startswith("        "):
            current_line_name[line_no] = head
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in current_line_name:
            out[current_line_name[tok.start[0]]] = tok.string.lstrip("#").strip()
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise TypeError(f"library config field {f.name!r} has no default; a launchpad config needs one")


def derive_config(
    lib_cls: type,
    *,
    name: str,
    asset: str | None = None,
    exclude: tuple[str, ...] = (),
    extra: dict[str, tuple[Any, Any]] | None = None,
    descriptions: dict[str, str] | None = None,
    all_optional: bool = False,
    nested: tuple[str, ...] = (),
    doc: str | None = None,
) -> type[dg.Config]:
    """Build a ``dg.Config`` subclass from the dataclass ``lib_cls``.

    Args:
        lib_cls: a ``@dataclass`` whose fields all have defaults.
        name: class name shown in the launchpad.
        asset: asset name whose ``DEMO_OVERRIDES`` apply.
        exclude: library fields that the asset sets itself (never shown).
        extra: asset-only fields ``{name: (type, pydantic Field(...))}``.
        descriptions: descriptions for library fields without a trailing comment.
        all_optional: every library field becomes ``Optional[...] = None`` ("use the preset's value"),
            for preset + override configs (``rqvae_model``).
        nested: library fields that hold a dataclass (e.g. ``train: SeqTrainConfig``); their fields are shown
            flat in the launchpad with the defaults of ``lib_cls()``'s instance, and ``to_lib`` rebuilds them.
    Returns: the class; its ``to_lib(**replace)`` returns ``lib_cls`` (``None`` overrides dropped when
    ``all_optional``). Raises ``TypeError`` for a library field without default.
    """
    hints = typing.get_type_hints(lib_cls)
    comments = field_comments(lib_cls)
    overrides = DEMO_OVERRIDES.get(asset or "", {})
    fields: dict[str, Any] = {}
    lib_names: list[str] = []
    nested_names: dict[str, list[str]] = {}
    tuple_fields: set[str] = set()
    lib_default = lib_cls() if nested else None
    for outer in nested:
        inner_cls = hints[outer]
        inner_default = getattr(lib_default, outer)
        inner_hints = typing.get_type_hints(inner_cls)
        inner_comments = field_comments(inner_cls)
        nested_names[outer] = []
        for f in dataclasses.fields(inner_cls):
            if not f.init or f.name.startswith("_"):
                continue
            nested_names[outer].append(f.name)
            tp = inner_hints[f.name]
            if typing.get_origin(tp) is tuple:  # launchpad lists; the library gets its tuple back
                tp = list[typing.get_args(tp)[0]]
                tuple_fields.add(f.name)
            desc = f.metadata.get("description") or inner_comments.get(f.name) or (descriptions or {}).get(f.name) or f.name
            default = overrides.get(f.name, getattr(inner_default, f.name))
            if f.name in overrides:
                desc = f"{desc} [demo-scale default; library default {getattr(inner_default, f.name)!r}]"
            if isinstance(default, (list, tuple, dict)):
                value = list(default) if isinstance(default, tuple) else default
                fields[f.name] = (tp, Field(default_factory=lambda v=value: type(v)(v), description=f"{desc} ({outer})"))
            else:
                fields[f.name] = (tp, Field(default, description=f"{desc} ({outer})"))
    for f in dataclasses.fields(lib_cls):
        if f.name in exclude or f.name.startswith("_") or not f.init or f.name in nested:
            continue
        lib_names.append(f.name)
        desc = f.metadata.get("description") or comments.get(f.name) or (descriptions or {}).get(f.name) or f.name
        tp = hints[f.name]
        if all_optional:
            fields[f.name] = (typing.Optional[tp], Field(None, description=f"{desc} (None = preset value)"))
        else:
            default = overrides.get(f.name, _default(f))
            if f.name in overrides:
                desc = f"{desc} [demo-scale default; library default {_default(f)!r}]"
            if isinstance(default, (list, dict)):
                value = default
                fields[f.name] = (tp, Field(default_factory=lambda v=value: type(v)(v), description=desc))
            else:
                fields[f.name] = (tp, Field(default, description=desc))
    for key, spec in (extra or {}).items():
        fields[key] = spec

    def to_lib(self, **replace: Any):
        values = {n: getattr(self, n) for n in lib_names}
        if all_optional:
            values = {k: v for k, v in values.items() if v is not None}
        for outer, names in nested_names.items():
            inner = {n: (tuple(getattr(self, n)) if n in tuple_fields else getattr(self, n)) for n in names}
            values[outer] = hints[outer](**inner)
        values.update(replace)
        return lib_cls(**values)

    lib_doc = lib_cls.__doc__ or ""
    if not doc and (not lib_doc or lib_doc.startswith(lib_cls.__name__ + "(")):  # dataclass's generated signature
        doc = f"Launchpad config derived from ``{lib_cls.__module__}.{lib_cls.__name__}`` (library defaults)."
    cls = create_model(name, __base__=dg.Config, __doc__=doc or lib_doc, **fields)
    cls.to_lib = to_lib  # type: ignore[attr-defined]
    cls.LIB_CLASS = lib_cls  # type: ignore[attr-defined]
    cls.LIB_FIELDS = tuple(lib_names)  # type: ignore[attr-defined]
    cls.NESTED_FIELDS = {k: tuple(v) for k, v in nested_names.items()}  # type: ignore[attr-defined]
    cls.__module__ = inspect.currentframe().f_back.f_globals.get("__name__", __name__)  # type: ignore[union-attr]
    return apply_settings(cls, asset) if asset else cls


# --------------------------------------------------------------------------------------------------
# project settings file -> config defaults

#: names (assets / checks) whose config takes defaults from the settings file -> their config class
#: without settings (``BUILTIN``)
CONFIGURABLE: dict[str, type] = {}


def _builtin_default(f: Any) -> Any:
    return f.get_default(call_default_factory=True)


def apply_settings(cls: type, name: str, settings: Settings | None = None) -> type:
    """``cls`` with the settings file's values for ``name`` as field defaults.

    Returns ``cls`` itself when the file has nothing for ``name``, else a subclass of the same name whose
    changed fields say where their default comes from (``[animind.yaml: 150; built-in default None]``).
    Either way the result carries ``BUILTIN`` (the class without settings) and ``name`` is registered as
    configurable (``check_settings`` rejects names nobody registered).

    Raises ``SettingsError`` naming the file, ``name`` and the field for an unknown field or a value that
    does not validate against the field's type.
    """
    settings = settings if settings is not None else current_settings()
    builtin = getattr(cls, "BUILTIN", cls)
    CONFIGURABLE[name] = builtin
    values = settings.for_name(name)
    if not values:
        cls.BUILTIN = builtin  # type: ignore[attr-defined]
        return cls
    model_fields = cls.model_fields  # type: ignore[attr-defined]
    by_alias = {(f.alias or k): k for k, f in model_fields.items()}
    overrides: dict[str, Any] = {}
    for key, raw in values.items():
        field_name = key if key in model_fields else by_alias.get(key)
        if field_name is None:
            raise settings.error(
                f"{name}.{key}: unknown config field of {name} ({cls.__name__}); "
                f"fields: {', '.join(sorted(model_fields))}"
            )
        f = model_fields[field_name]
        try:
            # YAML's yes/no/true/false are booleans: never let one become 1/0 of a number field
            value = TypeAdapter(f.annotation).validate_python(raw, strict=isinstance(raw, bool))
        except ValidationError as exc:
            first = exc.errors()[0].get("msg", str(exc)) if exc.errors() else str(exc)
            raise settings.error(f"{name}.{key}: {raw!r} is not valid for this field: {first}") from exc
        desc = f"{f.description or field_name} [{settings.path.name}: {value!r}; built-in default {_builtin_default(f)!r}]"
        # a plain default (pydantic copies mutable defaults per instance): Dagster's config schema, and so
        # the launchpad, only shows defaults given as values, not default_factory
        overrides[field_name] = (f.annotation, Field(value, description=desc, alias=f.alias))
    sub = create_model(cls.__name__, __base__=cls, __doc__=cls.__doc__, **overrides)
    sub.__module__ = cls.__module__
    sub.__qualname__ = cls.__qualname__
    sub.BUILTIN = builtin  # type: ignore[attr-defined]
    sub.SETTINGS = {k: values[k] for k in values}  # type: ignore[attr-defined]
    return sub


def settings_defaults(name: str):
    """Class decorator for hand-written ``dg.Config`` classes: ``apply_settings(cls, name)``."""

    def wrap(cls: type) -> type:
        return apply_settings(cls, name)

    return wrap


def check_settings(settings: Settings | None = None) -> None:
    """After every asset module is loaded: reject settings-file keys that name no configurable asset/check
    (``SettingsError`` naming the file and the key)."""
    check_unknown_names(settings if settings is not None else current_settings(), set(CONFIGURABLE))
