"""The millis cache directory, content hashes of files, and a model folder's weight files."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import os
from pathlib import Path

from millis.common.errors import MillisError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a Hugging Face folder's one weight file
# its one file, else its shard index (save_pretrained's layout past max_shard_size); safetensors first, as HF reads them
WEIGHT_LAYOUTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")


def weight_files(path: Path) -> list[Path]:
    """A Hugging Face model folder's weight files (encoders and decoders alike): its one file, or the shards its index
    names, in name order (WEIGHT_LAYOUTS' first present). A shard the index names but the folder lacks, or an index
    that names none, is refused by name."""
    for layout in WEIGHT_LAYOUTS:
        if not (path / layout).is_file():
            continue
        if layout in WEIGHT_FILES:
            return [path / layout]
        try:
            names = sorted(set(json.loads((path / layout).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MillisError(f"{path / layout}: not a shard index (a JSON object with a weight_map): {e}") from None
        if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise MillisError(f"{path / layout}: its weight_map names no shard files in this folder")
        if missing := [n for n in names if not (path / n).is_file()]:
            raise MillisError(f"{path}: {layout} names {len(names)} shards; missing: {', '.join(missing[:4])}")
        return [path / n for n in names]
    raise MillisError(f"{path} has no weights (one of {', '.join(WEIGHT_LAYOUTS)})")


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
    """$MILLIS_CACHE (an empty value: unset), else ~/.cache/millis; absolute, so a later cwd finds it too. Made
    private (0700) when new; one another user can write is refused: millis loads compiled kernels (code) and
    models from it, which someone else could plant (a shared /tmp folder, say)."""
    from millis.common.errors import MillisError

    d = Path(absolute(os.environ.get("MILLIS_CACHE") or str(Path.home() / ".cache" / "millis")))
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not own_file(d):
        raise MillisError(f"the millis cache {d} can be written by another user (owner uid {d.stat().st_uid}, mode "
                          f"{d.stat().st_mode & 0o777:o}): millis loads compiled kernels from it; set MILLIS_CACHE to "
                          f"a folder of your own that others cannot write (chmod go-w)")
    return d


def own_file(p: Path) -> bool:
    """p is this user's and no one else can write it (group-writable only for the user's own group, as user-private
    groups have it). Where there are no uids (Windows): True."""
    if not hasattr(os, "getuid"):
        return True
    st = p.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o002 and not (st.st_mode & 0o020 and st.st_gid != os.getgid())


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


def copy_regular(src: Path, dst: Path) -> None:
    """src (a file, or a folder of them) copied to dst, its regular files only: a symlink in a downloaded folder
    (to a credentials file, say) is left out, not copied as the file it points to into an artifact others get."""
    if src.is_symlink():
        return
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            copy_regular(child, dst / child.name)
    elif src.is_file():
        shutil.copy2(src, dst)


def replace_text(path: Path, text: str) -> None:
    """Write `path` through a temporary file beside it and os.replace: a symlink planted at `path` (in an artifact
    from elsewhere) is replaced, never written through."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
