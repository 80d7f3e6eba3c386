"""The millis cache directory and content hashes of files."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes alone (hash_files hashes the names too: there a renamed copy differs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    d = Path(os.environ.get("MILLIS_CACHE", Path.home() / ".cache" / "millis"))
    d.mkdir(parents=True, exist_ok=True)
    return d
