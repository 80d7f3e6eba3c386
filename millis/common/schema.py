"""JSON -> frozen typed dataclasses, the reading half of `millis.common.config.to_dict`.

`from_dict(cls, data, where)` checks every field against its annotation (str, int, float, bool,
Any, X | None, tuple[X, ...], list[X], dict[K, V], Shape, nested dataclasses) and fails with a
MillisError that names the file (`where`) and the field's dotted path. A required field that is
absent fails; an `optional` field that is absent, null or empty reads as its default. Keys the class
does not declare are ignored when reading a file and fail with `strict=True` (building a record to
write, where an unknown key would be silently lost). A value that already is the field's dataclass
is taken as it is.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, TypeVar, Union

from millis.common.config import Shape, is_empty
from millis.common.errors import MillisError

T = TypeVar("T")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kind(v: Any) -> str:
    return "null" if v is None else {dict: "an object", list: "a list"}.get(type(v), f"{type(v).__name__} {v!r:.60}")


def _bad(where: str, path: str, want: str, v: Any) -> MillisError:
    return MillisError(f"{where}: field {path!r} should be {want}, got {_kind(v)}")


def from_dict(cls: type[T], data: Any, where: str, path: str = "", strict: bool = False) -> T:
    """`data` (parsed JSON) as a `cls` instance; `where` names the file in errors, `path` the field."""
    if not isinstance(data, dict):
        raise _bad(where, path or cls.__name__, "an object", data)
    hints, kw = _hints(cls), {}
    fields = dataclasses.fields(cls)
    if strict and (unknown := sorted(set(data) - {f.name for f in fields})):
        raise MillisError(f"{where}: {cls.__name__} {path + ' ' if path else ''}has no field {unknown[0]!r}")
    for f in fields:
        p = f"{path}.{f.name}" if path else f.name
        optional = f.metadata.get("optional", False)
        if f.name in data and not (optional and is_empty(data[f.name])):
            kw[f.name] = convert(hints[f.name], data[f.name], where, p, strict)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MillisError(f"{where}: field {p!r} is missing")
    try:
        return cls(**kw)
    except MillisError as e:  # a class's own check of its values (__post_init__): name the file too
        raise MillisError(f"{where}: {e}") from None


def convert(tp: Any, v: Any, where: str, path: str, strict: bool = False) -> Any:
    """One JSON value as type `tp` (see the module doc)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return v
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return convert(inner[0], v, where, path, strict)
        for a in inner:
            try:
                return convert(a, v, where, path, strict)
            except MillisError:
                pass
        raise _bad(where, path, " or ".join(getattr(a, "__name__", str(a)) for a in inner), v)
    if tp is Shape:  # before dataclasses: a Shape is written as its name
        if not isinstance(v, str):
            raise _bad(where, path, "a shape name such as b1xs128", v)
        try:
            return Shape.parse(v)
        except MillisError as e:
            raise MillisError(f"{where}: field {path!r}: {e}") from None
    if dataclasses.is_dataclass(tp):
        return v if isinstance(v, tp) else from_dict(tp, v, where, path, strict)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(v, (list, tuple)):
            raise _bad(where, path, "a list", v)
        item = args[0] if args else Any
        items = [convert(item, x, where, f"{path}[{i}]", strict) for i, x in enumerate(v)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(v, dict):
            raise _bad(where, path, "an object", v)
        kt, vt = args or (str, Any)
        return {_key(kt, k, where, path): convert(vt, x, where, f"{path}.{k}", strict) for k, x in v.items()}
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise _bad(where, path, "a number", v)
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise _bad(where, path, "an integer", v)
    if tp in (str, bool):
        if isinstance(v, tp):
            return v
        raise _bad(where, path, "a string" if tp is str else "true or false", v)
    raise TypeError(f"from_dict cannot read a field of type {tp!r} ({path})")  # a programming error


def _key(kt: Any, k: str, where: str, path: str) -> Any:
    if kt is int:
        try:
            return int(k)
        except ValueError:
            raise MillisError(f"{where}: field {path!r} should have integer keys, got {k!r}") from None
    return k
