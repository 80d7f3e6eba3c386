"""One flag system for every command: argparse flags and MILLIS_* variables from config dataclass fields.

A field declared with `millis.common.config.flag` is a flag `--field-name` (a positional argument
where the command names it so) and a variable MILLIS_FIELD_NAME, or MILLIS_<COMMAND>_FIELD_NAME for
a `scoped` field (a name that means different things in different commands: MILLIS_OPTIMIZE_PRESET
is cpu|quick, MILLIS_TRAIN_PRESET default|quick). A boolean is `--x` / `--no-x`, and MILLIS_X /
MILLIS_NO_X. Values are parsed strictly, here, flags and variables alike; a bad one is one line
naming the flag or variable and what it accepts (`main` prints it and exits 2).

Precedence: the flag, then the variable, then the field's default (or the value of the preset the
command applies). Only what was given reaches the command's `config`, so a default is written once,
in the dataclass. An empty variable counts as unset. Variables are read for the command being run
only, after argparse has handled `--help`: a bad MILLIS_THREADS does not break `millis bench`, nor
`millis serve --help`. A MILLIS_* variable that no command declares, nor OTHER_VARIABLES lists, is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

from millis.artifact.store import META, holding_artifact
from millis.common.config import Shape, flag_fields, read_bool
from millis.common.errors import MillisError

ABSENT = object()  # neither flag nor variable given

# The MILLIS_* variables that are no command's flag (name: what reads it), the one list of them. Any other MILLIS_*
# variable that no command declares is refused (`check_variables`): MILLIS_PRESET=quick ran the full preset silently.
OTHER_VARIABLES = {
    "MILLIS_CACHE": "millis.common.files", "MILLIS_NO_KERNELS": "millis.kernels", "MILLIS_KERNEL_ISA": "millis.kernels",
    "MILLIS_NO_AMX": "millis.kernels", "MILLIS_NO_DECODE_LAYER": "millis.gpu", "MILLIS_NO_PDL": "millis.gpu",
    "MILLIS_NO_DECODE_GEMV": "millis.gen", "MILLIS_NO_FUSED_DECODE": "millis.gen",
    "MILLIS_NO_PREFILL_GRAPHS": "millis.gen",
    "MILLIS_DATA": "bench/, tests/ (the data directory)", "MILLIS_PEER_PYTHON": "bench/peers/setup.sh",
    "MILLIS_LLAMACPP_CMAKE_ARGS": "bench/peers/setup.sh", "MILLIS_CHROMIUM": "tests/browser.py",
    "MILLIS_SCREENSHOTS": "tests/test_browser_pages.py", "MILLIS_FUZZ_EXAMPLES": "tests/test_serve_fuzz.py",
}
EPILOG = ("Every flag is also a MILLIS_* variable (named in its help; booleans also MILLIS_NO_*): the flag beats "
          "the variable, the variable beats the default. An empty variable counts as unset.")


class Given:
    """The fields a command's flags and variables set, parsed, per config class they belong to."""

    def __init__(self, values: dict[type, dict[str, Any]], variables: dict[str, str] | None = None):
        self.values = values
        self.variables = variables or {}  # field -> the MILLIS_* variable its value came from (not a flag)

    def of(self, cls: type) -> dict[str, Any]:
        """{field: value} of `cls` given on the command line or in the environment (a fresh dict)."""
        return dict(self.values.get(cls, {}))

    def build(self, cls: type, base: Any = None, **fixed: Any) -> Any:
        """`cls` from its given fields (plus `fixed`); its defaults fill the rest, or `base`'s (a preset) where
        given. A config's check names the flag (`--threads must be >= 0`): where the value came from a variable,
        the error names the variable instead (`named`)."""
        with self.named():
            return dataclasses.replace(base, **self.of(cls), **fixed) if base is not None else cls(**self.of(cls), **fixed)

    @contextlib.contextmanager
    def named(self):
        """A MillisError raised inside names the variable a value came from where it names its flag."""
        try:
            yield
        except MillisError as e:
            msg = str(e)
            for name, variable in self.variables.items():
                msg = re.sub(rf"--{re.escape(name.replace('_', '-'))}(?![\w-])", variable, msg)
            raise MillisError(msg) from None


@dataclass(frozen=True)
class Command:
    """One `millis` sub-command: where its flags come from, how they become its config, what runs it."""

    name: str
    help: str
    # The config classes whose `flag` fields are the command's flags, in order; where two declare the
    # same name the first one owns it (so a command's own flags class comes first and may redeclare
    # `--out` with its own default). A function: some configs are slow to import (gen imports torch).
    groups: Callable[[], tuple[type, ...]]
    config: Callable[[Given], Any]       # the given flags -> what `run` takes (the CLI's only logic)
    run: Callable[[Any], int]            # calls the stage; the exit status
    positionals: tuple[str, ...] = ()    # fields taken as positional arguments, in this order
    # what the default --preset gives some fields (prune's recovery: 2 epochs, not TrainConfig's 8): their
    # defaults in --help
    preset: Callable[[], dict[str, Any]] = dict


class Parser(argparse.ArgumentParser):
    """argparse whose errors are a MillisError (one line, exit status 2 from `main`), not usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise MillisError(f"{message} (see {self.prog} --help)")


@cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def read_int(text: str) -> int:
    if re.fullmatch(r"[+-]?[0-9]+", text.strip()) is None:  # int() also takes "1_0" and other scripts' digits
        raise ValueError("expected an integer")
    return int(text)


FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def read_float(text: str) -> float:
    # float() also takes "1_0", other scripts' and fullwidth digits, "nan" and "inf"
    if FLOAT.fullmatch(text.strip()) is None:
        raise ValueError("expected a number")
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError("expected a finite number")
    return value


READERS: dict[Any, Callable[[str], Any]] = {bool: read_bool, int: read_int, float: read_float, str: str,
                                            Shape: Shape.parse}


def show(value: Any) -> str:
    """A default as a flag would spell it."""
    if isinstance(value, Shape):
        return value.name
    if isinstance(value, tuple):
        return ",".join(show(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


@dataclass(frozen=True)
class Flag:
    """One config field as seen by one command."""

    command: str
    owner: type
    field: dataclasses.Field
    positional: bool
    preset: Any = dataclasses.MISSING  # the default preset's value, where it has one (shown as the default)

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def meta(self) -> Any:
        return self.field.metadata

    @property
    def type(self) -> Any:
        return hints(self.owner)[self.name]

    @property
    def many(self) -> bool:
        return typing.get_origin(self.type) is tuple

    @property
    def option(self) -> str:
        return self.name if self.positional else "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.field.default is dataclasses.MISSING and self.field.default_factory is dataclasses.MISSING

    def variable(self, negated: bool = False) -> str:
        scope = self.command.upper() + "_" if self.meta["scoped"] else ""
        return f"MILLIS_{scope}{'NO_' if negated else ''}{self.name.upper()}"

    def variables(self) -> list[str]:
        if not self.meta["env"]:
            return []
        return [self.variable(), self.variable(negated=True)] if self.type is bool else [self.variable()]

    def choices(self) -> tuple | None:
        c = self.meta["choices"]
        return c() if callable(c) else c

    def parse(self, text: str, where: str, items: list[str] | None = None) -> Any:
        """`text` as this field's value; `where` (the flag or variable) names it in the error. A tuple
        field's items are comma-separated in `text`, or given one per argument (`items`)."""
        try:
            if self.meta["parse"] is not None:
                value = self.meta["parse"](text)
            elif self.many:
                item = READERS[typing.get_args(self.type)[0]]
                items = [t.strip() for t in text.split(",")] if items is None else items
                if len(items) > 1 and not all(items):
                    raise ValueError("an empty item in the list")
                value = tuple(item(t) for t in items if t)
                if not value and self.field.default != ():  # an empty list means the default where that is empty
                    raise ValueError("expected a comma-separated list")
            else:
                value = READERS[self.type](text)
        except ValueError as e:
            raise MillisError(f"{where}={text!r}: {e}") from None
        except MillisError as e:
            raise MillisError(f"{where}: {e}") from None
        choices = self.choices()
        if choices is not None and value not in choices:
            raise MillisError(f"{where}={text!r}: expected one of {', '.join(c or repr(c) for c in choices)}")
        return value

    def from_argument(self, raw: Any) -> Any:
        if self.type is bool:
            return raw  # --x / --no-x
        if self.positional and self.many:  # nargs="+": one item per argument, no comma splitting
            return self.parse(" ".join(raw), self.option, items=raw) if raw else ABSENT
        return self.parse(raw, self.option)

    def from_environment(self) -> Any:
        names = self.variables()
        texts = [os.environ.get(n, "") for n in names]
        if sum(1 for t in texts if t) > 1:
            raise MillisError(f"{' and '.join(names)} are both set; set one")
        for negated, (name, text) in enumerate(zip(names, texts)):
            if text:
                value = self.parse(text, name)
                return not value if negated else value
        return ABSENT

    def in_environment(self) -> bool:
        return any(os.environ.get(n) for n in self.variables())

    def help_text(self) -> str:
        text = self.meta["help"]
        d = self.field.default
        if self.preset is not dataclasses.MISSING:
            text += f" (default: {show(self.preset)}, the default preset's)"
        # the default, unless the text says it already ("(default: the preset's)", "0 = all cores")
        elif (d is not dataclasses.MISSING and d not in ("", ()) and "default" not in text
              and f"{show(d)} =" not in text):
            text += f" (default: {show(d)})"
        if self.variables():
            text += f" [env {' / '.join(self.variables())}]"
        return text.replace("%", "%%")  # argparse %-formats help

    def add_to(self, p: argparse.ArgumentParser) -> None:
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": self.help_text()}
        choices = self.choices() if self.type is str else None
        if choices:
            kw["metavar"] = "{" + ",".join(c for c in choices if c) + "}"
        needed = self.required and not self.in_environment()
        if self.positional:
            nargs = ("+" if needed else "*") if self.many else (None if needed else "?")
            p.add_argument(self.name, nargs=nargs, **kw)
        elif self.type is bool:
            p.add_argument(self.option, action=argparse.BooleanOptionalAction, **kw)
        elif self.meta["const"] is not None:
            p.add_argument(self.option, nargs="?", const=self.meta["const"], **kw)
        else:
            p.add_argument(self.option, required=needed, **kw)


def check_out_file(path: str, option: str, make_parents: bool = False, allowed: tuple[Path, ...] = ()) -> None:
    """Refuse an output file that cannot be written, before the work that produces it runs (an evaluation that
    took minutes used to end in a traceback from the final write). make_parents: missing directories are made.
    A file inside an artifact or model directory millis wrote is refused too (its files are hash-checked: a
    new or replaced one makes it corrupted), but for the `allowed` paths."""
    p = Path(path)
    if p.is_dir():
        raise MillisError(f"{option} {path}: is a directory; name a file")
    owner = holding_artifact(p)
    if owner is not None and p.resolve() not in {a.resolve() for a in allowed}:
        raise MillisError(f"{option} {path}: inside {owner}, whose files millis checks against its {META}; "
                          "write it elsewhere")
    parent = p.parent
    while not parent.exists() and make_parents and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MillisError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(p if p.exists() else parent, os.W_OK):
        raise MillisError(f"{option} {path}: not writable")


def flags_of(command: Command) -> list[Flag]:
    """The command's flags: positionals first, in the command's order, then the options in field order."""
    out: dict[str, Flag] = {}
    preset = command.preset()
    for cls in command.groups():
        for f in flag_fields(cls):
            out.setdefault(f.name, Flag(command.name, cls, f, f.name in command.positionals,
                                        preset.get(f.name, dataclasses.MISSING)))
    missing = set(command.positionals) - set(out)
    if missing:
        raise TypeError(f"millis {command.name}: no field for positional {sorted(missing)}")  # a programming error
    return [out[n] for n in command.positionals] + [f for f in out.values() if not f.positional]


def given(flags: list[Flag], ns: argparse.Namespace) -> Given:
    """The flags' values: from the command line, else the environment; required ones checked."""
    values: dict[type, dict[str, Any]] = {}
    variables: dict[str, str] = {}
    for fl in flags:
        value = fl.from_argument(getattr(ns, fl.name)) if hasattr(ns, fl.name) else ABSENT
        if value is ABSENT:
            value = fl.from_environment()
            if value is not ABSENT:
                variables[fl.name] = next(n for n in fl.variables() if os.environ.get(n))
        if value is ABSENT:
            if fl.required:
                alt = f" (or set {fl.variable()})" if fl.variables() else ""
                raise MillisError(f"millis {fl.command}: {fl.option} is required{alt}")
            continue
        values.setdefault(fl.owner, {})[fl.name] = value
    return Given(values, variables)


def check_variables(commands: tuple[Command, ...], chosen: Command, flags: list[Flag]) -> None:
    """Refuse a MILLIS_* variable that no command declares and OTHER_VARIABLES does not list: a misspelt
    MILLIS_OPTIMIZE_PRSET or a retired MILLIS_PRESET ran the full preset without a word. One some other command reads
    (MILLIS_PORT while optimizing) is that command's: left alone. The error names the variable meant where there is
    one: this command's scoped or unscoped spelling of it, else the closest name."""
    own = {v for fl in flags for v in fl.variables()}
    spare = sorted(n for n, v in os.environ.items()
                   if n.startswith("MILLIS_") and v and n not in own and n not in OTHER_VARIABLES)
    if not spare:  # the usual case: the other commands' configs (some slow to import) stay unimported
        return
    others = {v for c in commands if c is not chosen for fl in flags_of(c) for v in fl.variables()}
    unknown = [n for n in spare if n not in others]
    if unknown:
        raise MillisError("; ".join(f"{n}: {meant(n, chosen.name, own, others)}" for n in unknown))


def meant(name: str, command: str, own: set[str], others: set[str]) -> str:
    """Why `name` is refused, and the variable it was likely meant to be."""
    scope = f"MILLIS_{command.upper()}_"
    rest = name.removeprefix(scope) if name.startswith(scope) else name.removeprefix("MILLIS_")
    for guess in (scope + rest, "MILLIS_" + rest):  # MILLIS_PRESET -> MILLIS_OPTIMIZE_PRESET, and the other way
        if guess in own:
            return f"no millis command reads it; millis {command} reads {guess}"
    names = {n.removeprefix("MILLIS_"): n for n in sorted(own | others | set(OTHER_VARIABLES))}  # not the prefix
    close = difflib.get_close_matches(name.removeprefix("MILLIS_"), list(names), n=1, cutoff=0.8)
    hint = f"; did you mean {names[close[0]]}?" if close else ""
    scoped = sorted(n for n in own if n.startswith(scope))
    return (f"not a variable of millis {command} or of any millis command{hint} (millis {command}'s scoped ones: "
            f"{', '.join(scoped) or 'none'}; the others are MILLIS_<FLAG>, listed in --help)")


def parser(commands: tuple[Command, ...], chosen: Command | None) -> tuple[Parser, list[Flag]]:
    """`millis` with every command listed, and the flags of `chosen` only (the others' configs stay unimported)."""
    # no abbreviations: `--thread 3` set --threads, and a later flag --thread-... would change its meaning
    top = Parser(prog="millis", description="Make transformer inference millisecond-fast, and prove it.",
                 allow_abbrev=False)
    sub = top.add_subparsers(dest="command", required=True)
    flags: list[Flag] = []
    for c in commands:
        p = sub.add_parser(c.name, help=c.help, description=c.help, epilog=EPILOG, allow_abbrev=False)
        if c is chosen:
            flags = flags_of(c)
            for fl in flags:
                fl.add_to(p)
    return top, flags


def check_once(flags: list[Flag], argv: list[str]) -> None:
    """Refuse an option given twice (--no-X counts as --X): argparse keeps the last one silently, and
    `--out a ... --out b` wrote to b without a word."""
    spelled = {fl.option: fl.option for fl in flags if not fl.positional}
    spelled.update({"--no-" + fl.option[2:]: fl.option for fl in flags if not fl.positional and fl.type is bool})
    seen: set[str] = set()
    for arg in argv[1:]:
        if arg == "--":  # the rest are positional values
            break
        option = spelled.get(arg.split("=", 1)[0])
        if option in seen:
            raise MillisError(f"{option} is given twice; give it once")
        if option:
            seen.add(option)


def parse(commands: tuple[Command, ...], argv: list[str]) -> tuple[Command, Any]:
    """argv and the MILLIS_* variables -> the command and its config."""
    chosen = next((c for c in commands if argv[:1] == [c.name]), None)
    top, flags = parser(commands, chosen)
    ns = top.parse_args(argv)
    check_once(flags, argv)
    assert chosen is not None and ns.command == chosen.name  # argparse rejected anything else
    check_variables(commands, chosen, flags)
    return chosen, chosen.config(given(flags, ns))
