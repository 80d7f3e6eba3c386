"""Config primitives every stage's frozen config dataclass is built from: `flag` (a field that is also a CLI
flag and MILLIS_* variable), `optional`, `preset_of` (named presets), `Shape`, and `to_dict`.

Every config round-trips through plain JSON (`to_dict` here, `millis.common.schema.from_dict` back) so an
artifact's `millis.json` holds the exact recipe that built it.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

from millis.common.errors import MillisError

T = TypeVar("T")


def flag(default: Any = dataclasses.MISSING, help: str = "", *, parse: Callable[[str], Any] | None = None,
         choices: tuple | Callable[[], tuple] | None = None, const: Any = None, scoped: bool = False,
         env: bool = True):
    """A config field that is also a CLI flag `--name` and a variable MILLIS_<NAME> (millis.cli.flags).

    help:    the flag's help text; no default = a required flag.
    parse:   text -> value, for types the field's annotation does not say how to read (str, int,
             float, bool, Shape and tuples of them are read from the annotation).
    choices: the values accepted (or a function returning them, when listing them needs an import).
    const:   the value of the bare flag: `--compress` alone means `--compress default`.
    scoped:  the variable is MILLIS_<COMMAND>_<NAME>, because <NAME> means different things in
             different commands (MILLIS_OPTIMIZE_PRESET is cpu|quick, MILLIS_TRAIN_PRESET default|quick).
    env:     False: no variable (a list of texts to predict).
    """
    meta = {"help": help, "parse": parse, "choices": choices, "const": const, "scoped": scoped, "env": env}
    return field(default=default, metadata=meta)


BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def read_bool(text: str) -> bool:
    value = BOOLEANS.get(text.strip().lower())
    if value is None:
        raise ValueError("expected one of " + ", ".join(BOOLEANS))
    return value


def env_switch(name: str) -> bool:
    """A MILLIS_NO_* style switch read as flags' booleans are: unset or empty is False, "0" / "off" are False
    (any non-empty value used to count as set), and a value that is none of BOOLEANS names the variable."""
    text = os.environ.get(name, "")
    if not text.strip():
        return False
    try:
        return read_bool(text)
    except ValueError as e:
        raise MillisError(f"{name}={text!r}: {e}") from None


def check_at_least(obj: Any, lo: float, *names: str) -> None:
    """Each named field of a config at least lo, else a MillisError naming its flag (a negative --limit used to
    drop rows from the end, a negative --sample to raise from deep inside)."""
    for n in names:
        v = getattr(obj, n)
        if v < lo:
            raise MillisError(f"--{n.replace('_', '-')} must be >= {lo:g}, got {v}")


def flag_fields(cls) -> list:
    """The fields of a config class declared with `flag`, in order: what the CLI builds flags from."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def preset_of(table: Mapping[str, T], name: str, what: str) -> T:
    """The preset `name` of `table`, or one line naming `what` was asked for and what is available."""
    if name not in table:
        raise MillisError(f"unknown {what} {name!r}; available: {', '.join(table)}")
    return table[name]


def optional(default: Any = None):
    """A field that JSON may leave out: `to_dict` omits it while empty (None, "", (), {}) and
    `millis.common.schema.from_dict` reads it as `default` when absent, null or empty."""
    return field(default=default, metadata={"optional": True})


def is_empty(value: Any) -> bool:
    """What an `optional` field holds when it holds nothing."""
    return value is None or (isinstance(value, (str, tuple, list, dict)) and not value)


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
        """Parse `b1xs128`, `1x128` or `1,128` (ASCII digits; nothing else)."""
        m = re.fullmatch(r"(?:b?([0-9]+)xs?([0-9]+)|([0-9]+),([0-9]+))", text.strip().lower())
        if m is None:
            raise MillisError(f"cannot parse shape {text!r}; expected e.g. b1xs128")
        b, s = (int(g) for g in m.groups() if g is not None)
        return cls(b, s)


def to_dict(obj: Any) -> Any:
    """Dataclass -> JSON-ready dict (tuples become lists, shapes become their names, dict keys strings;
    an empty `optional` field is left out)."""
    if isinstance(obj, Shape):
        return obj.name
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("optional") and is_empty(getattr(obj, f.name)))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): to_dict(v) for k, v in obj.items()}
    return obj


