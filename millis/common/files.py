"""The millis cache directory and content hashes of files."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path


def hash_files(files: list[Path], names: list[str] | None = None) -> str:
    """sha256 over each file's name, then its bytes (`names`: hashed in place of the files' own, so a renamed
    copy can be matched with the file it copies)."""
    h = hashlib.sha256()
    for f, name in zip(files, names or [f.name for f in files]):
        h.update(name.encode())
        read_into(h, f)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes alone (hash_files hashes the names too: there a renamed copy differs)."""
    return read_into(hashlib.sha256(), path).hexdigest()


def read_into(h, path: str | Path):
    """h updated with the file's bytes, a MiB at a time; returns h."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h


def cache_dir() -> Path:
    """$MILLIS_CACHE (an empty value: unset), else ~/.cache/millis; absolute, so a later cwd finds it too."""
    d = Path(absolute(os.environ.get("MILLIS_CACHE") or str(Path.home() / ".cache" / "millis")))
    d.mkdir(parents=True, exist_ok=True)
    return d


def absolute(path: str) -> str:
    """`path` made absolute against the current directory, as a file's record must be ("" stays ""): a relative
    one would name another file, or none, when read from elsewhere. Symlinks are kept as given."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def raise_fd_limit() -> int:
    """The soft limit on open files up to the hard one (a load generator's open loop holds rate x latency
    connections; a server, its clients' connections); returns the soft limit now."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
