"""Artifacts: a directory with the chosen model, its tokenizer and `millis.json`.

Written atomically (built in a temp dir beside the target, then renamed into place); loading checks
the format version and every file's sha256, so a corrupted or half-copied artifact fails clearly.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from millis.common.errors import MillisError
from millis.common.files import hash_files

FORMAT = "millis-artifact"
FORMAT_VERSION = 1
META = "millis.json"


def write(out: Path, fill: Callable[[Path], dict[str, Any]], fmt: str = FORMAT) -> Path:
    """Create `out` atomically; `fmt` says what it is (an artifact, a trained model).
    `fill(tmp)` writes the files into tmp and returns the metadata; every file then present
    (but millis.json) is hashed into meta["files"]."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        meta = fill(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != META)
        meta = {"format": fmt, "version": FORMAT_VERSION, **meta,
                "files": {str(p.relative_to(tmp)): hash_files([p]) for p in files}}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
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


def format_of(path: str | Path) -> str | None:
    """The `format` a directory's millis.json declares (artifact, trained model...), None without one."""
    f = Path(path) / META
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def read_meta(path: Path, verify: bool = True) -> dict[str, Any]:
    """Read and validate millis.json; with verify, check every listed file's hash."""
    path = Path(path)
    if not path.is_dir():
        raise MillisError(f"artifact directory not found: {path}")
    mf = path / META
    if not mf.is_file():
        raise MillisError(f"{path} is not a millis artifact (no {META}); build one with `millis optimize`")
    try:
        meta = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MillisError(f"{mf} is corrupted (not valid JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MillisError(f"{mf} is not a millis artifact description")
    v = meta.get("version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise MillisError(f"{path} has artifact format version {v}; this millis reads up to {FORMAT_VERSION} "
                          f"(upgrade millis or rebuild the artifact)")
    if verify:
        for rel, digest in meta.get("files", {}).items():
            f = path / rel
            if not f.is_file():
                raise MillisError(f"artifact {path} is corrupted: {rel} is missing")
            if hash_files([f]) != digest:
                raise MillisError(f"artifact {path} is corrupted: {rel} does not match its recorded sha256")
    return meta
