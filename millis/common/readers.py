"""Labelled text files (CSV / TSV / JSONL) -> texts and string labels, with row-numbered errors.

Row numbers in messages are the file's line numbers (the CSV/TSV header is line 1), so a user can
open the file at the line the error names.
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from millis.common.errors import MillisError

FORMATS = (".csv", ".tsv", ".jsonl", ".json")
LABEL_COLUMNS = ("label", "category", "intent", "labels", "class")  # tried in order when none is named
MAX_LISTED = 8  # row numbers quoted in one error
# csv's default field limit is 131072 characters: a long document in one cell (a book chapter to embed) would be a
# _csv.Error. The whole file is in memory already, so no field can be larger than the limit set here.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class Labeled:
    texts: tuple[str, ...]
    labels: tuple[str, ...]     # as written in the file (numbers stay strings: "0", "1")
    lines: tuple[int, ...]      # file line of each row
    path: str
    text_col: str
    label_col: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> list[str]:
        """Sorted label names; numeric labels sort as numbers (2 before 10)."""
        return label_order(self.labels)


def subsample(data: Labeled, n: int, seed: int) -> Labeled:
    """A seeded random `n` rows in file order (all rows when n is 0 or not smaller than the file): `--sample`."""
    if not n or n >= len(data):
        return data
    return rows_of(data, sorted(random.Random(seed).sample(range(len(data)), n)))


def rows_of(data: Labeled, idx: list[int]) -> Labeled:
    """The rows `idx` of `data`, in that order."""
    return replace(data, texts=tuple(data.texts[i] for i in idx), labels=tuple(data.labels[i] for i in idx),
                   lines=tuple(data.lines[i] for i in idx))


def label_order(labels) -> list[str]:
    """The distinct labels sorted, the one order of classes (training's label ids, eval's per-class report):
    numeric labels as numbers (2 before 10), any other set as text."""
    names = set(labels)
    if all(n.lstrip("-").isdecimal() for n in names):
        try:
            return sorted(names, key=int)
        except ValueError:  # "--1": decimal digits, not a number
            pass
    return sorted(names)


WHOLE_NUMBER = re.compile(r"[+-]?\d+\.0*")  # 1.0, -2.00: what a spreadsheet or pandas writes for an integer label


def label_text(value: str) -> str:
    """A label as one class name: a whole number written as a float ("1.0" in a CSV, 1.0 in JSON) is that
    integer ("1"), so the same class reads the same from every format; any other label is kept as written."""
    if WHOLE_NUMBER.fullmatch(value):
        return str(int(float(value)))
    return value


def text_key(text: str) -> str:
    """A text as rows are matched loosely across files (a leak check): runs of whitespace as one space,
    case folded. "Where is  my card" and "where is my card" are one text."""
    return " ".join(text.split()).casefold()


def _decode(p: Path) -> str:
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise MillisError(f"{p}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                          f"re-save the file as UTF-8") from None


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (a BOM dropped); a byte that is not UTF-8 is one error naming its line."""
    p = Path(path)
    try:
        return _decode(p)
    except OSError as e:
        raise MillisError(f"cannot read {p}: {e.strerror or e}") from None


def _records(p: Path, text: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, [(line, record)]) for any supported format."""
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        if text.lstrip().startswith("["):
            raise MillisError(f"{p} is a JSON array: millis reads JSON Lines (one JSON object per line, "
                              f"e.g. {{\"text\": ..., \"label\": ...}}); write each row on a line of its own")
        rows, cols = [], {}
        for n, raw in enumerate(text_lines(text), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise MillisError(f"{p}: line {n} is not valid JSON ({e.msg}); millis reads JSON Lines: "
                                  f"one JSON object per line") from None
            if not isinstance(rec, dict):
                raise MillisError(f"{p}: line {n} is not a JSON object; millis reads JSON Lines: "
                                  f"one JSON object per line")
            cols.update(dict.fromkeys(rec))
            rows.append((n, rec))
        return list(cols), rows
    # newline="": only \n, \r\n and \r end a line, as the csv module expects. TSV: no quoting (the GLUE
    # convention): a '"' is text, so an unbalanced one cannot merge the lines after it into one row
    tsv = suffix == ".tsv"
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    cols = list(reader.fieldnames or [])
    rows = []
    for rec in reader:
        line = reader.line_num  # the row's last line (a quoted CSV field may span lines)
        if None in rec or None in rec.values():  # more fields than the header (under None), or fewer (None values)
            n = len(cols) + len(rec.get(None) or ()) - sum(v is None for v in rec.values())
            hint = ("" if n < len(cols) else "; a text must not hold a tab" if tsv
                    else '; quote a text that holds a comma: "a, b"')
            raise MillisError(f"{p}: line {line} has {n} field(s) but the header has {len(cols)} "
                              f"({', '.join(cols)}){hint}")
        rows.append((line, rec))
    if tsv:
        _unquoted(p, rows)
    return cols, rows


CSV_QUOTED = re.compile(r'"(?:[^"]|"")*""(?:[^"]|"")*"', re.S)  # "he said ""hi""": csv.writer's quoting


def _unquoted(p: Path, rows: list[tuple[int, dict]]) -> None:
    """A TSV is read unquoted (GLUE's convention): a field csv.writer quoted (wrapped in quotes, its own quotes
    doubled) would keep those quotes in the text, silently. Such a field is an error that says what to do."""
    for line, rec in rows:
        for col, v in rec.items():
            if isinstance(v, str) and CSV_QUOTED.fullmatch(v):
                raise MillisError(f"{p}: line {line}, column {col!r} is quoted as a CSV writer quotes ({v[:40]}): "
                                  f"millis reads .tsv files unquoted (the GLUE convention), so the quotes would "
                                  f"stay in the text; name the file .csv with commas as separators (quoted fields "
                                  f"are read as CSV), or save it as .jsonl")


# a separator found in a one-column header -> (its name, what to do)
SEPARATORS = {"\t": ("tab", "name it .tsv"), ";": ("semicolon", "re-save it with commas, or as .tsv or .jsonl"),
              ",": ("comma", "name it .csv")}


def _no_column(p: Path, cols: list[str], col: str, option: str) -> MillisError:
    """The error for a column the header lacks; a header of one column holding another separator says so."""
    own = "\t" if p.suffix.lower() == ".tsv" else ","
    found = [(name, fix) for sep, (name, fix) in SEPARATORS.items() if len(cols) == 1 and sep != own and sep in cols[0]]
    if found:
        (name, fix), = found[:1]
        return MillisError(f"{p} has no column {col!r}: its header is one column, {cols[0]!r}, holding a {name}: "
                           f"the file looks {name}-separated (millis reads .csv comma-separated, .tsv tab-separated); "
                           f"{fix}")
    return MillisError(f"{p} has no column {col!r} (columns: {', '.join(cols)}); name it with {option}")


def read_column(path: str | Path, column: str) -> list[str]:
    """The non-empty values of one column of a CSV / TSV / JSONL file (texts without labels)."""
    p = Path(path)
    cols, rows = _records(p, _decode(p))
    if column not in cols:
        raise _no_column(p, cols, column, "--text-col")
    _once(p, cols, column)
    values = ("" if rec.get(column) is None else str(rec[column]) for _, rec in rows)
    return [v for v in values if v.strip()]


def _once(p: Path, cols: list[str], *used: str) -> None:
    """A column read must be named once in the header: DictReader keeps the last of two (the wrong labels, without
    a word). Other repeated names (blank cells a spreadsheet leaves, two unused notes columns) do not matter."""
    for c in used:
        if cols.count(c) > 1:
            raise MillisError(f"{p}: the header names column {c!r} {cols.count(c)} times; which one holds the data?")


def _pick_label_col(p: Path, cols: list[str], text_col: str) -> str:
    for c in LABEL_COLUMNS:
        if c in cols:
            return c
    others = [c for c in cols if c != text_col]
    if len(others) == 1:
        return others[0]
    raise MillisError(f"{p}: cannot tell which column holds the labels (columns: {', '.join(cols)}); "
                      f"name it with --label-col")


def _value(p: Path, line: int, rec: dict, col: str) -> str:
    """A cell as text. JSON: a whole-number float is that integer (1.0 and 1 are one class: label_text); a list,
    an object, true / false, NaN / Infinity and (for a present key) null are errors: str() would make classes
    like "['x']"."""
    v = rec.get(col)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    json_null = v is None and col in rec and p.suffix.lower() in (".jsonl", ".json")
    if isinstance(v, (list, dict, bool)) or (isinstance(v, float) and not math.isfinite(v)) or json_null:
        raise MillisError(f"{p}: line {line}, column {col!r}: {json.dumps(v)[:40]} is not a string or a number "
                          f"(each row needs one text and one label)")
    return "" if v is None else str(v)


def read_labeled(path: str | Path, text_col: str = "text", label_col: str = "", limit: int = 0) -> Labeled:
    """Read a labelled file; `label_col` "" picks a usual name (label, category, ...)."""
    p = Path(path)
    if not p.is_file():
        raise MillisError(f"data file not found: {p}")
    if p.suffix.lower() not in FORMATS:
        raise MillisError(f"{p}: unsupported file type {p.suffix or '(none)'}; use one of {', '.join(FORMATS)}")
    cols, rows = _records(p, _decode(p))
    if not rows:
        raise MillisError(f"{p} has no data rows")
    if text_col not in cols:
        raise _no_column(p, cols, text_col, "--text-col")
    label_col = label_col or _pick_label_col(p, cols, text_col)
    if label_col not in cols:
        raise _no_column(p, cols, label_col, "--label-col")
    _once(p, cols, text_col, label_col)
    texts, labels, lines, empty_text, empty_label = [], [], [], [], []
    for n, rec in rows:
        t, y = _value(p, n, rec, text_col), label_text(_value(p, n, rec, label_col).strip())
        if not t.strip():
            empty_text.append(n)
        if not y:
            empty_label.append(n)
        texts.append(t.strip())
        labels.append(y)
        lines.append(n)
    for what, bad in (("empty text", empty_text), ("no label", empty_label)):
        if bad:
            shown = ", ".join(map(str, bad[:MAX_LISTED])) + (f" and {len(bad) - MAX_LISTED} more"
                                                             if len(bad) > MAX_LISTED else "")
            raise MillisError(f"{p}: {len(bad)} row(s) with {what}, at line(s) {shown}; fix or remove them")
    if limit:
        texts, labels, lines = texts[:limit], labels[:limit], lines[:limit]
    return Labeled(tuple(texts), tuple(labels), tuple(lines), str(p), text_col, label_col)


def text_lines(text: str) -> list[str]:
    """`text`'s lines, broken at \\n, \\r\\n and \\r only: str.splitlines also breaks at form feeds, U+0085,
    U+2028... which a text may hold, and one line would become several texts."""
    return LINE_BREAK.split(text)


LINE_BREAK = re.compile(r"\r\n|\r|\n")


def read_texts(path: str | Path, column: str = "text", limit: int = 0) -> list[str]:
    """One text per line (any other file) or a column of a CSV/TSV file or of a JSONL file's
    objects; blank texts are skipped, and a file with none is an error."""
    p = Path(path)
    if not p.is_file():
        raise MillisError(f"text file not found: {p}")
    if p.suffix.lower() in FORMATS:  # labelled files are valid text sources too (millis eval, --data)
        texts = read_column(p, column)
    else:
        texts = [t for t in text_lines(_decode(p)) if t.strip()]
    if not texts:
        raise MillisError(f"{p} has no non-empty texts")
    return texts[:limit] if limit else texts
