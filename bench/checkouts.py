"""What the before / after benches share: other checkouts to run the same thing from (--code LABEL=DIR,
alternated with this one), and the result file (strict JSON: no bare NaN)."""
from __future__ import annotations

import argparse
import json
import math
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


def finite(obj, where: str = "$", found: list[str] | None = None):
    """obj with every non-finite float (NaN, inf) replaced by None; `found` collects where each was (a
    JSON path such as $.rows[3].cos_min)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if found is not None:
            found.append(where)
        return None
    if isinstance(obj, dict):
        return {k: finite(v, f"{where}.{k}", found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def result_json(out: dict, indent: int | None = 1) -> str:
    """The result as strict JSON (allow_nan=False: never a bare NaN, which no JSON parser takes). A non-finite
    number the script did not catch itself becomes null and its place is listed under `non_finite`, so a
    long run is never lost to one NaN at the end."""
    try:
        return json.dumps(out, indent=indent, allow_nan=False)
    except ValueError:
        found: list[str] = []
        clean = finite(out, found=found)
        clean["non_finite"] = found
        print(f"WARNING non-finite numbers written as null: {', '.join(found[:10])}", flush=True)
        return json.dumps(clean, indent=indent, allow_nan=False)


def write_result(path: str | Path, out: dict, indent: int | None = 1, quiet: bool = False) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(result_json(out, indent) + "\n")
    if not quiet:
        print(f"wrote {path}")


def alternated(trees: dict[str, Path], rounds: int, one_round) -> dict[str, list[dict]]:
    """{tree: its rounds' results}: one_round(dir) for each tree a round, the order reversed every other round
    (so neither tree always runs first on a machine warming up or slowing down), each printed as it comes."""
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for i in range(rounds):
        for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
            runs[name].append(one_round(trees[name]))
            print(name, json.dumps(runs[name][-1]), flush=True)
    return runs


def trees_compared(doc: str, rounds: int, out: str, one_round) -> tuple[argparse.Namespace, dict[str, Path], dict]:
    """A before / after bench's command line (--code, --rounds, --out; `doc`'s first paragraph its help) parsed,
    and its trees' alternated rounds: (args, {tree: dir}, {tree: results})."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_code_flag(ap)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--out", default=out)
    a = ap.parse_args()
    trees = {"this": Path(__file__).resolve().parents[1], **checkouts(ap, a.code)}
    return a, trees, alternated(trees, a.rounds, one_round)


def tree_rows(trees: dict[str, Path], runs: dict[str, list[dict]], median) -> list[dict]:
    """The result file's rows: per tree its dir, median(its rounds) and the rounds themselves."""
    return [{"tree": name, "dir": str(trees[name]), "median": median(rs), "rounds": rs} for name, rs in runs.items()]
