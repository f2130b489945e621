"""Config files → typed, validated dataclasses, once, at the boundary.

Configs are TOML files (the shipped ones are ``fwjax/configs/NAME.toml``), read with the
standard library's ``tomllib``; ``key.path=value`` overrides (``--set`` on the command line) are
applied to the parsed dictionary before it is converted. :func:`structure` converts a nested
dictionary into the frozen dataclasses of :mod:`fwjax.train.config` (enums from their values,
nested dataclasses, ``tuple[...]`` and ``X | None``), rejecting unknown keys by name; each
dataclass's ``__post_init__`` then validates the values. :func:`unstructure` is its inverse
(JSON-ready), and :func:`to_toml` writes such a dictionary back as TOML text.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fwjax import configs as shipped_configs
from fwjax.train.config import TrainConfig


def structure(cls: Any, data: Any, path: str = "config") -> Any:
    """Converts plain data (from TOML/JSON) to an instance of the type ``cls``.

    Args:
      cls: a dataclass, enum, ``tuple[X, ...]``, ``X | None``, or a scalar type.
      data: dicts, lists and scalars.
      path: where ``data`` sits in the config, for error messages.

    Raises:
      ValueError / TypeError naming the offending key and value.
    """
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(cls)
        if data is None:
            if type(None) in options:
                return None
            raise ValueError(f"{path} must not be None")
        non_none = [o for o in options if o is not type(None)]
        if len(non_none) != 1:
            raise TypeError(f"{path}: unsupported union {cls}")
        return structure(non_none[0], data, path)
    if origin is tuple:
        args = typing.get_args(cls)
        if not isinstance(data, list | tuple):
            raise TypeError(f"{path}={data!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(structure(args[0], x, f"{path}[{i}]") for i, x in enumerate(data))
        if len(args) != len(data):
            raise ValueError(f"{path}={data!r} must have {len(args)} entries")
        pairs = enumerate(zip(args, data, strict=True))
        return tuple(structure(a, x, f"{path}[{i}]") for i, (a, x) in pairs)
    if dataclasses.is_dataclass(cls):
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise TypeError(f"{path}={data!r} must be a table of {cls.__name__} fields")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {path}; valid keys: {sorted(names)}")
        kwargs = {k: structure(hints[k], v, f"{path}.{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from e
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        if isinstance(data, cls):
            return data
        try:
            return cls(data)
        except ValueError:
            valid = [m.value for m in cls]
            raise ValueError(f"{path}={data!r} is not one of {valid}") from None
    if cls is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise TypeError(f"{path}={data!r} must be a number")
        return float(data)
    if cls is int or cls is bool or cls is str:
        if not isinstance(data, cls) or (cls is int and isinstance(data, bool)):
            raise TypeError(f"{path}={data!r} must be of type {cls.__name__}")
        return data
    if cls is Any:
        return data
    raise TypeError(f"{path}: unsupported config type {cls}")


def unstructure(obj: Any) -> Any:
    """The inverse of :func:`structure`: plain dicts, lists and scalars (JSON-ready)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: unstructure(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [unstructure(x) for x in obj]
    return obj


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys are strings, got {key!r}")
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string (same escapes) once DEL, which TOML forbids raw, is
    # escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any, path: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # 0.001, 2.5e-05, inf, -inf: all TOML floats
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        items = (_toml_value(x, f"{path}[{i}]") for i, x in enumerate(value))
        return "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        pairs = (f"{_toml_key(k)} = {_toml_value(v, f'{path}.{k}')}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }" if value else "{}"
    raise TypeError(f"{path}={value!r} has no TOML form (TOML has no null)")


def to_toml(data: dict, *, inline: tuple[str, ...] = ()) -> str:
    """TOML text of a nested dictionary, :func:`load_toml`'s inverse (``tomllib.loads(to_toml(d))
    == d``).

    Every dictionary becomes a ``[dotted.name]`` table, after the plain values of its parent and
    separated from the previous table by one blank line, unless its key is in ``inline``: those
    (and dictionaries inside arrays) are written as inline tables ``{ a = 1, b = "x" }``. A table
    that holds only tables gets no header of its own. Strings are basic strings, floats their
    shortest ``repr`` (``1e-3`` -> ``0.001``), arrays ``[a, b]``.

    Args:
      data: string keys; values bool, int, float, str, lists/tuples of values, dicts.
      inline: keys (at any depth) whose tables are written inline, e.g. ``("feature_map",)``.

    Returns:
      The text, ending with a newline (empty for an empty ``data``).

    Raises:
      TypeError: naming the dotted path of a value with no TOML form (None, objects) or a
        non-string key.
    """
    sections: list[str] = []

    def emit(table: dict, name: str) -> None:
        plain = {k: v for k, v in table.items() if not isinstance(v, dict) or k in inline}
        tables = {k: v for k, v in table.items() if isinstance(v, dict) and k not in inline}
        lines = [f"[{name}]"] if name and (plain or not tables) else []
        for key, value in plain.items():
            path = f"{name}.{key}" if name else str(key)
            lines.append(f"{_toml_key(key)} = {_toml_value(value, path)}")
        if lines:
            sections.append("\n".join(lines) + "\n")
        for key, value in tables.items():
            emit(value, f"{name}.{_toml_key(key)}" if name else _toml_key(key))

    emit(data, "")
    return "\n".join(sections)


def parse_value(text: str) -> Any:
    """An override's value: a TOML literal (``3``, ``2.5e-4``, ``true``, ``"x"``, ``[1, 2]``),
    else the raw string (so ``--set data.path=/tmp/x.txt`` needs no quotes)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_fields(data: dict, fields: Mapping[str, Any]) -> dict:
    """Sets ``{"key.path": value}`` fields in a nested dict (returns a new dict); a value may be
    a config dataclass or enum (stored as :func:`unstructure` gives it)."""
    data = copy.deepcopy(data)
    for key, value in fields.items():
        *parents, leaf = key.strip().split(".")
        node = data
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"field {key!r}: {p!r} is not a table")
            node = child
        node[leaf] = unstructure(value)
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies ``key.path=value`` overrides (TOML literals) to a nested dict (returns a new
    dict)."""
    fields = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like key.path=value")
        fields[key.strip()] = parse_value(value.strip())
    return set_fields(data, fields)


def find_config(name_or_path: str | Path, search_dirs: list[Path]) -> Path:
    """A config file: an existing path, or ``NAME`` / ``NAME.toml`` in one of ``search_dirs``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for d in search_dirs:
        for candidate in (d / path, d / f"{path}.toml"):
            if candidate.is_file():
                return candidate
    names = sorted({p.stem for d in search_dirs if d.is_dir() for p in d.glob("*.toml")})
    raise FileNotFoundError(
        f"config {str(name_or_path)!r} is neither a file nor one of {names} "
        f"(searched {[str(d) for d in search_dirs]})"
    )


def load_toml(path: Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


# Values that configs stored before a field existed were trained with (the field's behaviour
# then), by the table the field belongs to. A run's ``config.json`` holds every field of its
# time, so a missing field means an older run, never an omission.
_STORED_BEFORE = {
    ("lm", "model"): dict(
        embed_init_std=1.0, embed_scale=True, activation="relu", scale_residual_init=False
    ),
    ("optimizer",): dict(decay_matrices_only=False),
}


def upgrade_stored(data: dict) -> dict:
    """A stored run config (``workdir/config.json``) with the fields it predates filled with
    the behaviour it was trained with, so an old run is rebuilt as the model it was.

    Args:
      data: the parsed JSON of a stored config (not modified).

    Returns:
      A copy with the missing fields of :data:`_STORED_BEFORE` added.
    """
    data = json.loads(json.dumps(data))
    for path, fields in _STORED_BEFORE.items():
        table = data
        for key in path:
            table = table.get(key) if isinstance(table, dict) else None
        if isinstance(table, dict):
            for key, value in fields.items():
                table.setdefault(key, value)
    return data


# The shipped configs are package data (a plain directory in a wheel or a checkout).
CONFIG_DIRS = [Path(str(shipped_configs.config_dir()))]


def load_train_config(name_or_path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Reads a TOML config and converts it to a validated :class:`TrainConfig`.

    Args:
      name_or_path: a path, or the name of a shipped config (``fwjax configs`` lists them).
      overrides: ``key.path=value`` strings (TOML literals).

    Returns:
      The config.

    Raises:
      FileNotFoundError: no such config (the message lists the available names).
      ValueError / TypeError: malformed TOML (naming the file and line), unknown keys or bad
        values (naming them).
    """
    path = find_config(name_or_path, CONFIG_DIRS)
    try:
        data = load_toml(path)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"malformed TOML in {str(path)!r}: {e}") from e
    return structure(TrainConfig, apply_overrides(data, overrides or []))


def with_overrides(config: TrainConfig, fields: Mapping[str, Any]) -> TrainConfig:
    """``config`` with ``{"key.path": value}`` fields replaced (as ``--set`` would, but with
    Python values: numbers, None, enums, config dataclasses), validated again.

    Example: ``with_overrides(config, {"steps": 500, "optimizer.learning_rate": 3e-4})``.
    """
    return structure(type(config), set_fields(unstructure(config), fields))
