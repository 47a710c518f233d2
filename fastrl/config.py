"""Configs: plain nested dataclasses, loaded from YAML plus `key.sub=value` overrides.

    cfg = load_config(TrainConfig, "recipes/grpo.yaml", ["optim.lr=1e-6", "monitor.enabled=false"])

Every value is checked against its dataclass field type (int, float, bool, str, Path,
Optional/Union, Literal, list/tuple/dict, nested dataclasses), so a typo or a bad value fails at
start-up with the full dotted key instead of hours into a run. After loading, every dataclass
that defines `validate()` is asked to reject impossible combinations (children before parents).
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem: unknown key, bad type, invalid value or impossible combination."""


# ---------------------------------------------------------------- YAML (1.2-style scalars)
# PyYAML follows YAML 1.1: `1e-6` is a *string* (no dot), `on`/`yes` are booleans and
# `2024-01-01` is a date. For configs we want the YAML 1.2 reading of those scalars.

class _Loader(yaml.SafeLoader):
    pass


_BOOL, _FLOAT, _TIMESTAMP = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float",
                             "tag:yaml.org,2002:timestamp")
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT, _TIMESTAMP)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
     [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@dataclasses.dataclass(frozen=True)
class _Override:
    """A `--set` value: parsed YAML plus the raw text, so `name=007` stays "007" for a str field."""
    raw: str
    value: Any


# ---------------------------------------------------------------- loading

def load_config(cls: type[T], path_or_dict: str | os.PathLike | dict | None = None,
                overrides: typing.Iterable[str] = ()) -> T:
    """Build `cls` from a YAML file (or a dict, or nothing: all defaults), apply `key.sub=value`
    overrides, type-check everything and run the `validate()` methods."""
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    if path_or_dict is None:
        raw: dict = {}
    elif isinstance(path_or_dict, dict):
        raw = _deep_copy(path_or_dict)
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = parse_yaml(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping, "
                              f"got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    obj = _build(cls, raw, "")
    _validate(obj, "")
    return obj


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value of override {key!r}: {text!r} ({e})") from None
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:   # absent or null (e.g. an Optional section): create it
            child = node[part] = {}
        elif isinstance(child, _Override) and child.value is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[:i + 1])!r} is not a "
                              f"section (it is {child!r})")
        node = child
    node[parts[-1]] = _Override(text.strip(), value)


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as e:  # unresolvable forward reference: fail loudly, naming the class
        raise TypeError(f"cannot resolve field types of {cls.__qualname__}: {e}") from e


def _build(cls: type[T], data: Any, prefix: str) -> T:
    if isinstance(data, _Override):
        data = data.value
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"config key {prefix!r} must be a section (mapping) for "
                          f"{cls.__name__}, got {data!r}")
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(str(key), list(fields), prefix))
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required config key {full!r}")
            continue
        value = data[name]
        # A partial section overrides the field's default instance, not the class defaults:
        # with `optim: Optim = field(default_factory=lambda: Optim(lr=1e-5))`, setting only
        # `optim.betas` must keep lr=1e-5.
        if isinstance(value, dict):
            default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else f.default)
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                value = _merge(dump_config(default), value)
        kwargs[name] = _coerce(value, hints[name], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # from __post_init__
        raise ConfigError(f"invalid config {prefix or cls.__name__!r}: {e}") from e


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _unknown_key_message(key: str, valid: list[str], prefix: str) -> str:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {(f'{prefix}.{close[0]}' if prefix else close[0])!r}?"
    else:
        hint = "valid keys: " + ", ".join(valid) if valid else "this section takes no keys"
    return f"unknown config key {full!r} ({hint})"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where the reading is unambiguous."""
    raw = value.raw if isinstance(value, _Override) else None
    if isinstance(value, _Override):
        value = value.value
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if tp is Any or tp is object:
        return value
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(_Override(raw, value) if raw is not None else value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        expected = " | ".join(_type_name(a) for a in args)
        raise ConfigError(f"config key {key!r} expects {expected}, got {value!r}")
    if value is None:
        raise ConfigError(f"config key {key!r} expects {_type_name(tp)}, got null")
    if origin is Literal:
        for choice in args:
            # type check too: True == 1, but `mode: true` must not select Literal[1]
            if value == choice and type(value) is type(choice):
                return choice
            if raw is not None and isinstance(choice, str) and raw == choice:
                return choice
        raise ConfigError(f"config key {key!r} must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        raise ConfigError(f"config key {key!r} must be one of "
                          f"{[m.name for m in tp]}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} expects a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)   # `1e3` is a fine way to write 1000 steps
        raise ConfigError(f"config key {key!r} expects an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} expects a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None and not isinstance(value, (list, dict)):
            return raw   # `--set name=007`: the text as typed
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
    if tp is Path or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        if raw is not None:
            return Path(raw)
        raise ConfigError(f"config key {key!r} expects a path, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r} expects {len(args)} items, "
                                  f"got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping, got {value!r}")
        ktp, vtp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            k2 = _coerce(k, ktp, f"{key} (key {k!r})")
            out[k2] = _coerce(v, vtp, f"{key}.{k}")
        return out
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"config key {key!r} expects {tp.__name__}, got {value!r}")
    raise TypeError(f"config key {key!r}: unsupported field type {tp!r}")


def _validate(obj: Any, prefix: str) -> None:
    """Call `validate()` on every dataclass in the tree, children first; errors become
    ConfigErrors that name the section (the message itself names the keys)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        full = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _validate(value, full)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v) and not isinstance(v, type):
                    _validate(v, f"{full}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v) and not isinstance(v, type):
                    _validate(v, f"{full}.{k}")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            where = f"invalid config {prefix!r}: " if prefix else "invalid config: "
            raise ConfigError(where + str(e)) from e


# ---------------------------------------------------------------- dumping

def dump_config(obj: Any) -> Any:
    """A dataclass tree as plain YAML/JSON-able dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: dump_config(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: dump_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [dump_config(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def save_config(obj: Any, path: str | os.PathLike) -> Path:
    """Write the config as YAML (atomically, so a run dir never holds half a config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(dump_config(obj), sort_keys=False, default_flow_style=False))
    os.replace(tmp, path)
    return path
