"""Frozen dataclass configs: help text on every field, unknown keys rejected, values validated.

Extension: declare a ``@dataclass(frozen=True)`` whose fields are built with ``option(...)``, validate
in ``__post_init__`` with ``require(...)``, and load it with ``from_dict(Cls, mapping)``. Byte sizes
accept integers or strings such as ``"64MiB"``. Values are never auto-corrected: a bad value raises
``ConfigError`` naming the config, the key and the accepted range. No I/O happens here except
``load_toml``, which only reads the file it is given.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from tiermem.errors import ConfigError

T = TypeVar("T")

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, *, what: str = "size") -> int:
    """Turn ``4096``, ``"4KiB"``, ``"1.5GB"`` into a byte count; raise ConfigError otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"config: {what} must be a byte count, got a boolean {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"config: {what} must be >= 0 bytes, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else None
        if match and unit in _UNITS:
            nbytes = float(match.group(1)) * _UNITS[unit]
            if nbytes != int(nbytes):
                raise ConfigError(f"config: {what}={value!r} is not a whole number of bytes")
            return int(nbytes)
    raise ConfigError(
        f"config: cannot parse {what}={value!r} as a size; use an integer or a string like "
        f"'512MiB', '4GiB', '1.5GB' (units: {', '.join(u for u in _UNITS if u)})"
    )


def format_bytes(nbytes: float) -> str:
    """Human-readable binary size, e.g. ``64.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def option(default: Any = dataclasses.MISSING, *, help: str, unit: str | None = None) -> Any:
    """A config field with mandatory help text; ``unit="bytes"`` makes it accept size strings."""
    metadata = {"help": help, "unit": unit}
    if isinstance(default, (list, dict, set)):
        raise TypeError("config defaults must be immutable; use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


def require(condition: bool, config: object, message: str) -> None:
    """Raise ConfigError naming the config class when ``condition`` is false."""
    if not condition:
        raise ConfigError(f"config {type(config).__name__}: {message}")


def help_text(cls: type) -> dict[str, str]:
    """Field name -> help text, for CLIs and docs."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def from_dict(cls: type[T], data: Mapping[str, Any] | T, *, where: str | None = None) -> T:
    """Build the frozen dataclass ``cls`` from a mapping, converting and checking every value."""
    if isinstance(data, cls):
        return data
    where = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"config {where}: expected a table/dict, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"config {where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        field = fields[name]
        kwargs[name] = _convert(value, hints[name], field.metadata.get("unit"), f"{where}.{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"config {where}: missing required key(s) {missing}")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data form of a config (enums by value), suitable for JSON/TOML output."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value
    return plain(config)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict; a missing or malformed file is a ConfigError."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config: file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {str(path)!r} is not valid TOML: {exc}") from None


def _convert(value: Any, hint: Any, unit: str | None, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], unit, where)
        raise AssertionError(f"unsupported union in config field {where}: {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config {where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0]
        return tuple(_convert(v, item, unit, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config {where}: expected a table/dict, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where=where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        try:
            return hint(value)
        except ValueError:
            choices = [m.value for m in hint]
            raise ConfigError(f"config {where}: {value!r} is not one of {choices}") from None
    if unit == "bytes":
        return parse_bytes(value, what=where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"config {where}: expected {hint.__name__}, got {value!r}")
        return value
    if hint is Any:
        return value
    raise AssertionError(f"unsupported config field type at {where}: {hint}")
