"""Typed values from the command line: one parser for every frozen-dataclass config (experiments' sections in
train/config.py, curation specs in data/curate/spec.py).

It sits beside errors.py at the bottom of the dependency graph because both `train` and `data` use it and `data`
may not import `train`. A value comes as a command-line string or a JSON value and leaves as the field's type, or
a UserError naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Literal

from parallel.errors import UserError


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def parse_value(key: str, raw: Any, tp: Any) -> Any:
    """Convert a command-line string (or a JSON value) to the field's type, or raise UserError naming the key."""
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        for a in allowed:
            if raw == a or str(raw) == str(a):
                return a
        raise UserError(f"--{key}: {raw!r} is not allowed; use {_type_name(tp)}")
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key}: expects true or false, got {raw!r}")
    if tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        text = str(raw).replace("_", "")
        try:
            return int(text)
        except ValueError:
            pass
        try:  # 1e3 is a fine way to write 1000
            f = float(text)
        except ValueError:
            f = float("nan")
        if f.is_integer():
            return int(f)
        raise UserError(f"--{key}: expects an integer, got {raw!r}")
    if tp is float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise UserError(f"--{key}: expects a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise UserError(f"--{key}: expects a finite number, got {raw!r}")
        return value
    if tp is str:
        return str(raw)
    if typing.get_origin(tp) is tuple and typing.get_args(tp) == (str, ...):  # a,b,c or a list
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        return tuple(str(s).strip() for s in items if str(s).strip())
    if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return parse_records(key, raw, typing.get_args(tp)[0])
    raise UserError(f"--{key}: cannot be set from the command line")


def parse_records(key: str, raw: Any, cls: type) -> tuple:
    """A tuple of small dataclasses (e.g. data.sources) from JSON: a list of objects, on the command line as text."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"--{key}: expects a JSON list of objects, e.g. '[{{\"path\": \"a.txt\"}}]' ({e.msg})") \
                from None
    if isinstance(raw, dict) or not isinstance(raw, (list, tuple)):
        raise UserError(f"--{key}: expects a JSON list of objects, got {type(raw).__name__}")
    types_ = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    items = []
    for i, rec in enumerate(raw):
        if isinstance(rec, cls):
            items.append(rec)
            continue
        if not isinstance(rec, dict):
            raise UserError(f"--{key}[{i}]: expects an object with keys {', '.join(names)}")
        unknown = sorted(set(rec) - set(names))
        if unknown:
            raise UserError(f"--{key}[{i}]: unknown key {unknown[0]!r}; allowed: {', '.join(names)}")
        fields = {k: parse_value(f"{key}[{i}].{k}", v, types_[k]) for k, v in rec.items()}
        try:
            items.append(cls(**fields))
        except TypeError as e:
            raise UserError(f"--{key}[{i}]: {e}") from None
    return tuple(items)


def field_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}
