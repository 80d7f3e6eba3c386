"""What the before / after benches share: other checkouts to run the same thing from (--code LABEL=DIR,
alternated with this one), and the result file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_code_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--code", action="append", default=[], metavar="LABEL=DIR",
                    help="another millis checkout to run the same from (e.g. the commit before a change)")


def checkouts(ap: argparse.ArgumentParser, specs: list[str]) -> dict[str, Path]:
    """{LABEL: DIR} of --code's values, each a millis checkout (an argparse error names a bad one)."""
    out = {}
    for spec in specs:
        label, _, d = spec.partition("=")
        if not label or not d or not Path(d, "millis").is_dir():
            ap.error(f"--code takes LABEL=DIR with DIR a millis checkout: {spec!r}")
        out[label] = Path(d).resolve()
    return out


def write_result(path: str | Path, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
