"""Config round trips: nested dicts, TOML/JSON files and ``section.field=value`` overrides.

``config_from_dict`` builds a ``TrainConfig`` from nested tables (missing keys keep the base's
values; unknown sections or keys raise ConfigError listing the valid ones; every value is
type-checked against its field's annotation by ``coerce``). ``load_config`` reads TOML (stdlib
``tomllib``, Python 3.11+) or JSON; ``apply_overrides`` takes the strings the command line and
sweeps produce. The dataclasses themselves are ``cs336.config``.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from dataclasses import asdict, fields, replace
from pathlib import Path

from cs336.config import SECTIONS, ConfigError, TrainConfig

INT64_MAX = 2 ** 63 - 1


def section_fields(section: str) -> dict[str, typing.Any]:
    """Field name -> resolved type annotation of one section."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value, tp, key: str):
    """Check ``value`` (from JSON/TOML, or a string from the command line) against type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",")] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{key} expects {len(item_types)} values, got {len(value)}: {value!r}")
        return tuple(coerce(v, t, key) for v, t in zip(value, item_types, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp is int:
        return _fits_int64(_parse_int(value, key), key)
    if tp is float:
        number = _parse_float(value, key)
        if not math.isfinite(number):
            raise ConfigError(f"--{key}={value!r} is not a finite number; pass an ordinary value such "
                              "as 3e-4 (NaN and infinity are refused)")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} expects a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _parse_int(value, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and math.isfinite(number) and number.is_integer():
                return int(number)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise ConfigError(f"--{key} expects an integer, got {value!r}")


def _fits_int64(n: int, key: str) -> int:
    if not -INT64_MAX <= n <= INT64_MAX:
        raise ConfigError(f"--{key}={n} does not fit a 64-bit integer (|value| <= {INT64_MAX}); "
                          "pass a smaller value")
    return n


def _parse_float(value, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"--{key}={value!r} is too large for a float; pass a smaller value") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"--{key} expects a number, got {value!r}")


def _unknown(kind: str, key: str, valid) -> ConfigError:
    return ConfigError(f"unknown {kind} {key!r}; valid {kind}s: {', '.join(valid)}")


def config_to_dict(cfg: TrainConfig) -> dict:
    """Nested plain dict (tuples become lists), JSON-serializable."""
    return json.loads(json.dumps(asdict(cfg)))


def config_from_dict(d: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Build a TrainConfig from a nested dict, starting from ``base`` (default: TrainConfig()).

    Missing keys keep the base's values; unknown sections or keys raise ConfigError listing the
    valid ones; values are type-checked.
    """
    base = base or TrainConfig()
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a table of sections, got {type(d).__name__}")
    sections = {}
    for name, values in d.items():
        if name not in SECTIONS:
            raise _unknown("section", name, SECTIONS)
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a table, got {values!r}")
        field_types = section_fields(name)
        updates = {}
        for key, value in values.items():
            if key not in field_types:
                raise _unknown(f"{name} key", key, field_types)
            updates[key] = coerce(value, field_types[key], f"{name}.{key}")
        sections[name] = replace(getattr(base, name), **updates)
    return replace(base, **sections)


def read_text_file(flag: str, path: str | Path) -> str:
    """The UTF-8 text of the file ``flag`` names; a missing, binary (a checkpoint passed by
    mistake) or undecodable file is a ConfigError saying what it is."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise ConfigError(f"{flag} {p} is not a regular file (a directory, device, pipe or socket); pass a file")
    if not p.is_file():
        raise ConfigError(f"{flag} {p} does not exist; check the path")
    data = p.read_bytes()
    if b"\x00" in data[:8192]:
        kind = "a zip archive (a checkpoint?)" if data[:2] == b"PK" else "a binary file"
        raise ConfigError(f"{flag} {p} is {kind}, not a text config file; pass a JSON config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{flag} {p} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a TOML or JSON file of sections (``[optim] lr = 3e-4``) on top of ``base``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a TOML or JSON file to --config")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; check the --config path")
    text = read_text_file("--config", path)  # a device or pipe is refused there
    try:
        if path.suffix == ".toml":
            d = tomllib.loads(text)
        elif path.suffix == ".json":
            d = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: use a .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} does not parse ({exc}); fix its syntax") from None
    try:
        return config_from_dict(d, base)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``["section.field=value", ...]``; values are parsed by the field's type."""
    nested: dict[str, dict[str, str]] = {}
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r} must look like section.field=value "
                              f"(sections: {', '.join(SECTIONS)})")
        if section not in SECTIONS:
            raise _unknown("section", section, SECTIONS)
        nested.setdefault(section, {})[name] = value
    return config_from_dict(nested, cfg)


def changed_fields(cfg: TrainConfig, base: TrainConfig | None = None) -> list[str]:
    """``section.field=value`` for every field of ``cfg`` that differs from ``base`` (default:
    ``TrainConfig()``), in field order: the short form of a config for a log line."""
    base = TrainConfig() if base is None else base
    out = []
    for section in SECTIONS:
        mine, theirs = asdict(getattr(cfg, section)), asdict(getattr(base, section))
        out += [f"{section}.{k}={v!r}" for k, v in mine.items() if v != theirs.get(k)]
    return out
