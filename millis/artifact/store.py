"""Directories described by a `millis.json` (millis.artifact.meta): artifacts (the chosen model, its tokenizer)
and the model dirs `millis train` / distill / prune write.

Written atomically (built in a temp dir beside the target, then renamed into place); loading checks
the format version and every file's sha256, so a corrupted or half-copied artifact fails clearly.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from millis.artifact.meta import FORMAT, FORMAT_VERSION, META, ArtifactMeta, TrainMeta, format_of, is_artifact
from millis.common.errors import MillisError
from millis.common.files import hash_files

UNHASHED = "report.html"  # the one file written into an artifact after its millis.json (optimize.report_html)
__all__ = ["FORMAT", "FORMAT_VERSION", "META", "format_of", "is_artifact", "read_meta", "write"]

M = TypeVar("M", ArtifactMeta, TrainMeta)


def write(out: Path, fill: Callable[[Path], M]) -> Path:
    """Create `out` atomically. `fill(tmp)` writes the files into tmp and returns their millis.json
    (an ArtifactMeta or TrainMeta, which says the format); every file then present (but millis.json)
    is hashed into its `files`. What is written is read back first: a file this millis cannot read
    is never written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        meta = fill(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != META)
        meta = dataclasses.replace(meta, files={str(p.relative_to(tmp)): hash_files([p]) for p in files})
        text = json.dumps(meta.to_dict(), indent=2, sort_keys=True)
        type(meta).from_dict(json.loads(text), f"{META} being written to {out}")
        (tmp / META).write_text(text)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: Path, verify: bool = True) -> ArtifactMeta:
    """Read and validate an artifact's millis.json; with verify, check every listed file's hash."""
    path = Path(path)
    if not path.is_dir():
        raise MillisError(f"artifact directory not found: {path}")
    mf = path / META
    if not mf.is_file():
        raise MillisError(f"{path} is not a millis artifact (no {META}); build one with `millis optimize`")
    try:
        raw = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MillisError(f"{mf} is corrupted (not valid JSON: {e})") from None
    meta = ArtifactMeta.from_dict(raw, str(mf))
    if verify:
        # every file write() put there is listed: an empty list, or a file the list lacks (report.html, a view
        # written after, aside), is a millis.json edited or replaced, not one to trust
        listed = set(meta.files)
        present = (str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name not in (META, UNHASHED))
        unlisted = sorted(rel for rel in present if rel not in listed)
        if not listed or unlisted:
            what = "lists no files" if not listed else f"does not list {', '.join(unlisted[:3])}"
            raise MillisError(f"artifact {path} is corrupted: its {META} {what}")
        for rel, digest in meta.files.items():
            f = path / rel
            if not f.is_file():
                raise MillisError(f"artifact {path} is corrupted: {rel} is missing")
            if hash_files([f]) != digest:
                raise MillisError(f"artifact {path} is corrupted: {rel} does not match its recorded sha256")
    return meta
