"""The settings toolkit: every setting of fedsynth is a dataclass field declared with ``setting``.

A field says its flat key (default: the name with dashes), type (its annotation), default, one
line of help, and where it applies: ``choices`` (a tuple, or a function returning a registry's
names, e.g. the reducers of ``server/aggregation.py``), ``path`` (a file or folder: relative ones
are resolved against the settings file's folder by whoever reads a file), ``sep`` (a list kept as
one string or tuple; TOML lists are joined with it). ``parse`` replaces the type's coercion for
a setting whose values need more than a type (a range, a table).

``Codec(cls)`` is the one flat codec over such a dataclass, nested dataclasses included: run
settings (``server/run_config.py``), hospital settings (``client/settings.py``), the coordinator's
address (``protocol/coordinator.py``) and the ``model.`` / ``train.`` / ``data.`` scalars of a
round's config record (``protocol/records.py``). Unknown keys are refused with one "did you
mean" (the known keys listed only when none is close).

Pure Python: no Flower, no torch (``shared_models`` is imported by every side).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Mapping, Sequence, TypeVar

T = TypeVar("T")

REQUIRED: Any = dataclasses.MISSING  # ``setting(REQUIRED, ...)``: a key without a default

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool,
                           "Path": Path, "Path | None": Path}


def setting(default: Any, help: str, key: str | None = None,  # noqa: A002 - the word users read
            run: bool = True, *, choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
            path: bool = False, sep: str | None = None,
            parse: Callable[[Any, str], Any] | None = None,
            encode: Callable[[Any], Any] | None = None,
            fallback: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that is a setting: ``key`` (default: the name with dashes) and help.

    ``run=False`` keeps a field off the run configuration (it is derived, e.g. ``num_classes``
    from the class list); it still travels in a round's config record. ``help`` may hold
    ``{choices}``, replaced by the choices (the empty one left out). ``parse(value, key)`` reads a
    value its own way, ``encode(value)`` writes it back flat; ``fallback()`` gives the value when
    the key is absent or empty (e.g. an environment variable).
    """
    meta = {"help": help, "key": key, "run": run, "choices": choices, "path": path, "sep": sep,
            "parse": parse, "encode": encode, "fallback": fallback}
    if default is REQUIRED:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Setting:
    """One setting: its flat key, where it lives in the tree (``path``), type, default and help."""

    key: str
    path: tuple[str, ...]
    type: type
    default: Any
    declared_help: str
    run: bool = True
    choice_source: Any = None
    is_path: bool = False
    sep: str | None = None
    parse: Callable[[Any, str], Any] | None = None
    encode: Callable[[Any], Any] | None = None
    fallback: Callable[[], Any] | None = None

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def choices(self) -> tuple[str, ...]:
        src = self.choice_source
        return tuple(src() if callable(src) else src) if src is not None else ()

    @property
    def help(self) -> str:
        if "{choices}" not in self.declared_help:
            return self.declared_help
        return self.declared_help.replace("{choices}", ", ".join(c for c in self.choices if c))

    def get(self, obj: Any) -> Any:
        for name in self.path:
            obj = getattr(obj, name)
        return obj

    def flat(self, value: Any) -> Any:
        """The value as a flat scalar (a TOML / config-record value)."""
        if self.encode is not None:
            return self.encode(value)
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple) and self.sep:
            return self.sep.join(map(str, value))
        return value


def settings_of(cls: type, derived: bool = False, _path: tuple[str, ...] = ()
                ) -> Iterator[Setting]:
    """Every ``setting`` field of ``cls``, nested dataclass fields (default factories) walked;
    ``derived`` includes the ``run=False`` ones."""
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            yield from settings_of(factory, derived, (*_path, f.name))  # type: ignore[arg-type]
            continue
        if "help" not in f.metadata or not (derived or f.metadata["run"]):
            continue
        annotation = str(f.type)
        kind = _TYPES.get(annotation) or (tuple if annotation.startswith("tuple[") else None)
        if kind is None:
            raise TypeError(f"setting {cls.__name__}.{f.name}: type {annotation} is not a setting "
                            "type (int, float, str, bool, Path, tuple)")
        m = f.metadata
        yield Setting(key=m["key"] or f.name.replace("_", "-"), path=(*_path, f.name),
                      type=kind, default=f.default, declared_help=m["help"], run=m["run"],
                      choice_source=m["choices"], is_path=m["path"] or kind is Path,
                      sep=m["sep"], parse=m["parse"], encode=m["encode"], fallback=m["fallback"])


def check_choices(obj: Any, error: type[Exception] = ValueError) -> None:
    """Refuse a field of ``obj`` (not nested) outside its choices: for ``__post_init__``, so a
    dataclass built directly is held to them as well as one decoded by a codec."""
    for s in settings_of(type(obj), derived=True):
        if len(s.path) == 1 and s.choice_source is not None and s.get(obj) not in s.choices:
            raise error(f"{s.key} {s.get(obj)!r} is not one of "
                        f"{', '.join(repr(c) if not c else c for c in s.choices)}")


def env_path(name: str) -> Callable[[], str]:
    """A ``fallback``: the first folder of environment variable ``name`` (systemd's
    ``$STATE_DIRECTORY`` may list several, ':' separated)."""
    return lambda: os.environ.get(name, "").split(":")[0]


def flag(value: Any, key: str, what: str = "setting",
         error: type[Exception] = ValueError) -> bool:
    """A bool from TOML, JSON or a command line's text."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no", ""):
        return False
    raise error(f"{what} {key!r} must be true or false, got {value!r}")


def unknown_message(keys: Sequence[str], known: Sequence[str], what: str = "setting",
                    misnomers: Mapping[str, str] | None = None, see: str = "",
                    plain: bool = False) -> str:
    """One "did you mean X" per mistyped key; the full list only when nothing is close.

    ``plain`` names the keys unquoted after ``what`` + "(s)" (the hospital files' wording)."""
    hints = {k: (misnomers or {}).get(k) or next(iter(difflib.get_close_matches(k, known, n=1)),
                                                 "")
             for k in keys}
    if len(keys) == 1 and hints[keys[0]] and not plain:
        return f"unknown {what} {_q(keys[0], plain)}: did you mean {hints[keys[0]]!r}?"
    named = ", ".join(f"{_q(k, plain)} (did you mean {h!r}?)" if h else _q(k, plain)
                      for k, h in hints.items())
    plural = "(s)" if plain else "s" if len(keys) > 1 else ""
    listed = "" if all(hints.values()) else f"; known: {', '.join(known)}"
    return f"unknown {what}{plural} {named}{listed}{see}"


def _q(key: str, plain: bool) -> str:
    return key if plain else repr(key)


class Codec(Generic[T]):
    """The flat codec of one settings dataclass: ``decode`` (flat mapping -> instance) and
    ``encode`` (instance -> flat mapping).

    ``what`` names a setting in messages ("run setting"); ``error`` is the exception raised;
    ``lenient`` coerces text ("3", "true": a command line's node config) where a strict codec
    wants the type itself (TOML and Flower give typed values); ``derived`` includes the
    ``run=False`` fields (a config record carries them). ``context`` prefixes the dataclass's
    own refusals (``__post_init__``: "run settings: ...").
    """

    def __init__(self, cls: type[T], what: str = "setting", *, error: type[Exception] = ValueError,
                 lenient: bool = False, derived: bool = False,
                 misnomers: Mapping[str, str] | None = None, see: str = "",
                 plain: bool = False, context: str | None = None) -> None:
        self.cls, self.what, self.error, self.lenient = cls, what, error, lenient
        self.context = context
        self.misnomers, self.see, self.plain = dict(misnomers or {}), see, plain
        self.settings: tuple[Setting, ...] = tuple(settings_of(cls, derived))
        self.by_key = {s.key: s for s in self.settings}
        self.by_name = {s.name: s for s in self.settings}
        if len(self.by_key) != len(self.settings):
            raise TypeError(f"two settings of {cls.__name__} share a key")

    # ---------------------------------------------------------------- keys
    def keys(self) -> tuple[str, ...]:
        return tuple(self.by_key)

    def unknown_message(self, keys: Sequence[str]) -> str:
        return unknown_message(keys, self.keys(), self.what, self.misnomers, self.see, self.plain)

    def check_keys(self, values: Mapping[str, Any]) -> None:
        unknown = sorted(k for k, v in values.items() if k not in self.by_key and v is not None)
        if unknown:
            raise self.error(self.unknown_message(unknown))

    # ---------------------------------------------------------------- values
    def coerce(self, s: Setting, value: Any) -> Any:
        """The value as the setting's type; a wrong one is ``error`` naming the key."""
        if s.parse is not None:
            return s.parse(value, s.key)
        if isinstance(value, Mapping):
            raise self.error(f"{self.what} {s.key!r} is a {s.type.__name__}, not a table "
                             f"([run.{s.key}] is not a thing)")
        if s.type is Path:
            return Path(str(value)).expanduser() if value not in (None, "") else None
        if s.type is tuple:
            items = value.split(s.sep or ",") if isinstance(value, str) else list(value)
            return tuple(str(x).strip() for x in items if str(x).strip())
        if s.type is str and isinstance(value, list) and all(isinstance(x, str) for x in value):
            return (s.sep or ",").join(value)  # classes = ["cyst", "metastasis"] reads naturally
        if s.type is bool:
            if isinstance(value, bool):
                return value
            if self.lenient:
                return flag(value, s.key, self.what, self.error)
        elif self.lenient and not isinstance(value, (bool, list)):
            try:
                return s.type(value)
            except (TypeError, ValueError):
                pass
        elif s.type is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif s.type is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif s.type is str and isinstance(value, str):
            return value
        raise self.error(f"{self.what} {s.key!r} must be a {s.type.__name__}, got {value!r}")

    def lookup(self, values: Mapping[str, Any], prefix: str = "", spelling: str = "key"
               ) -> dict[Setting, Any]:
        """The settings ``values`` holds, by ``spelling``: "key" (``image-size``), "name"
        (``image_size``, a config record and ``config.json``) or "either"."""
        table = {"key": self.by_key, "name": self.by_name}
        known: dict[str, Setting] = {}
        for spell in (("key", "name") if spelling == "either" else (spelling,)):
            known.update({prefix + k: s for k, s in table[spell].items()})
        unknown = sorted(k for k, v in values.items()
                         if k.startswith(prefix) and k not in known and v is not None)
        if unknown:
            raise self.error(self.unknown_message([k[len(prefix):] for k in unknown]))
        return {known[k]: v for k, v in values.items() if k in known}

    def decode(self, values: Mapping[str, Any], prefix: str = "", spelling: str = "key") -> T:
        """An instance from flat settings; every mistake is ``error`` naming the key. With a
        ``prefix`` only the keys that start with it are read (a config record holds others)."""
        given = self.lookup(values, prefix, spelling)
        parts: dict[tuple[str, ...], dict[str, Any]] = {}
        for s in self.settings:
            value = given.get(s, None)
            if value == "" and (s.fallback is not None or s.type is Path):
                value = None  # an empty path is no path
            if value is None and s.fallback is not None:
                value = s.fallback() or None
            if value is None:
                if s.required:
                    raise self.error(f"{self.what} {s.key!r} is missing")
                continue
            parts.setdefault(s.path[:-1], {})[s.name] = self.coerce(s, value)
        try:
            return _build(self.cls, parts, ())
        except (TypeError, ValueError) as exc:
            if self.context is None and not isinstance(exc, TypeError):
                raise
            raise self.error(f"{self.context or self.what + 's'}: {exc}") from None

    def encode(self, obj: T, prefix: str = "", spelling: str = "key",
               changed_only: bool = False) -> dict[str, Any]:
        """Flat settings of ``obj``; ``changed_only`` leaves out the defaults (and None), keeping
        the required ones."""
        out: dict[str, Any] = {}
        for s in self.settings:
            value = s.get(obj)
            if changed_only and not s.required and (value is None or value == s.default):
                continue
            out[prefix + (s.key if spelling == "key" else s.name)] = s.flat(value)
        return out

    def defaults(self) -> dict[str, Any]:
        """Every key with its default."""
        return {s.key: s.flat(s.default) for s in self.settings if not s.required}


def _build(cls: type, parts: Mapping[tuple[str, ...], dict[str, Any]], path: tuple[str, ...]
           ) -> Any:
    kwargs = dict(parts.get(path, {}))
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            kwargs[f.name] = _build(factory, parts, (*path, f.name))  # type: ignore[arg-type]
    return cls(**kwargs)
