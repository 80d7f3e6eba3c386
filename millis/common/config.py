"""Typed, frozen configuration for every stage, with named presets.

Every config round-trips through plain JSON (`to_dict` / `from_dict`) so an artifact's
`millis.json` holds the exact recipe that built it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from millis.common.errors import MillisError


def flag(default, help: str):
    """A config field that is also a CLI flag (and MILLIS_<NAME> env var); `help` is its help text."""
    return field(default=default, metadata={"help": help})


def flag_fields(cls) -> list:
    """The fields of a config class declared with `flag`, in order: what the CLI builds flags from."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


@dataclass(frozen=True, order=True)
class Shape:
    """One static input shape: `batch` rows of exactly `seq` tokens."""

    batch: int
    seq: int

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq < 1:
            raise MillisError(f"shape must have batch >= 1 and seq >= 1, got {self.batch}x{self.seq}")

    @property
    def name(self) -> str:  # e.g. "b1xs128", the key used in reports and JSON
        return f"b{self.batch}xs{self.seq}"

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """Parse `b1xs128`, `1x128` or `1,128`."""
        t = text.strip().lower().replace("b", "").replace("s", "").replace(",", "x")
        try:
            b, s = (int(p) for p in t.split("x"))
        except ValueError:
            raise MillisError(f"cannot parse shape {text!r}; expected e.g. b1xs128") from None
        return cls(b, s)


def to_dict(obj: Any) -> Any:
    """Dataclass -> JSON-ready dict (tuples become lists, shapes become their names)."""
    if isinstance(obj, Shape):
        return obj.name
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    return obj


