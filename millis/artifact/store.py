"""Directories described by a `millis.json` (millis.artifact.meta): artifacts (the chosen model, its tokenizer)
and the model dirs `millis train` / distill / prune write.

Written atomically (built in a temp dir beside the target, then renamed into place), replacing only an empty
directory or one millis wrote, never what the command reads (check_out); loading checks
the format version and every file's sha256, so a corrupted or half-copied artifact fails clearly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from millis.artifact.meta import (FORMAT, FORMAT_VERSION, META, TRAIN_FORMAT, ArtifactMeta, TrainMeta, format_of,
                                  is_artifact, read_train_meta)
from millis.common.errors import MillisError
from millis.common.files import hash_files

UNHASHED = "report.html"  # the one file written into an artifact after its millis.json (optimize.report_html)
__all__ = ["FORMAT", "FORMAT_VERSION", "META", "check_out", "format_of", "is_artifact", "read_meta",
           "verified_train_meta", "write"]

M = TypeVar("M", ArtifactMeta, TrainMeta)


def check_out(out: str | Path, keep: tuple[str | Path, ...] = ()) -> None:
    """Refuse an `--out` that write() must not replace: anything but an empty directory or one millis wrote
    (its millis.json declares an artifact or a trained model, any version), and any path that is, holds or
    lies inside one of `keep` (the source model, the files the command reads). Called before the work
    starts too, so a bad --out fails in a second, not after the training or the measurements."""
    out = Path(out).resolve()
    for k in (Path(k).resolve() for k in keep if k):  # "": a file not given (Path("") would be the cwd)
        if out == k or out in k.parents or k in out.parents:
            what = "is" if out == k else "contains" if out in k.parents else "is inside"
            raise MillisError(f"--out {out} {what} {k}, which this command reads: choose another --out")
    if out.is_dir():
        if any(out.iterdir()) and format_of(out) not in (FORMAT, TRAIN_FORMAT):
            raise MillisError(f"--out {out} is a directory that millis did not write (it is not empty and has no "
                              f"{META}): refusing to replace it; choose another --out or remove it")
    elif out.exists():
        raise MillisError(f"--out {out} is a file, not a directory: refusing to replace it")
    parent = next(p for p in out.parents if p.exists())  # where write() makes its temporary directory (or above)
    try:  # a real write: access() says yes to root on a read-only or kernel file system
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.check-"))
    except OSError as e:
        raise MillisError(f"--out {out}: cannot write in {parent} ({e.strerror}); choose another --out") from None


def readable(tmp: Path) -> None:
    """The modes the umask gives new files (mkdtemp makes 0700, safetensors 0600): an artifact built by one user
    is served by another (a service account, a container's user)."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for f in tmp.rglob("*"):
        if not f.is_symlink():  # (chmod would follow it out of the artifact)
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def write(out: Path, fill: Callable[[Path], M], keep: tuple[str | Path, ...] = ()) -> Path:
    """Create `out` atomically. `fill(tmp)` writes the files into tmp and returns their millis.json
    (an ArtifactMeta or TrainMeta, which says the format); every file then present (but millis.json)
    is hashed into its `files`. What is written is read back first: a file this millis cannot read
    is never written. Only an empty directory or one millis wrote is replaced, never one of `keep`
    (check_out)."""
    out = Path(out)
    check_out(out, keep)
    if out.is_symlink():  # write where it points (check_out judged that directory); renaming the link would
        out = out.resolve()  # leave the target as it was and the new artifact in the link's place
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        meta = fill(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.relative_to(tmp) != Path(META))
        meta = dataclasses.replace(meta, files={str(p.relative_to(tmp)): hash_files([p]) for p in files})
        text = json.dumps(meta.to_dict(), indent=2, sort_keys=True)
        type(meta).from_dict(json.loads(text), f"{META} being written to {out}")
        (tmp / META).write_text(text)
        readable(tmp)
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


def holding_artifact(path: Path) -> Path | None:
    """The artifact or model directory (one with a millis.json) that `path` would lie inside, if any."""
    for d in Path(path).resolve().parents:
        if (d / META).is_file():
            return d
    return None


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
    if isinstance(raw, dict) and raw.get("format") == TRAIN_FORMAT:
        raise MillisError(f"{mf} describes a model `millis train` wrote, not an artifact: `millis optimize {path} "
                          f"--out ART` builds one (millis eval takes the model as it is)")
    meta = ArtifactMeta.from_dict(raw, str(mf))
    if verify:
        verify_files(path, meta, "artifact")
    return meta


def verify_files(path: Path, meta: ArtifactMeta | TrainMeta, what: str) -> None:
    """Check that `path` holds exactly the files `meta.files` lists, each with its recorded sha256; else a
    MillisError naming `what` (artifact, model directory), the directory and the file."""
    # every file write() put there is listed: an empty list, or a file the list lacks (report.html, a view
    # written after, aside), is a millis.json edited or replaced, not one to trust
    listed = set(meta.files)
    present = (rel for rel in (str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
               if rel not in (META, UNHASHED))
    unlisted = sorted(rel for rel in present if rel not in listed)
    if not listed or unlisted:
        why = "lists no files" if not listed else f"does not list {', '.join(unlisted[:3])}"
        raise MillisError(f"{what} {path} is corrupted: its {META} {why}")
    for rel, digest in meta.files.items():
        f = path / rel
        if not f.is_file():
            raise MillisError(f"{what} {path} is corrupted: {rel} is missing")
        if hash_files([f]) != digest:
            raise MillisError(f"{what} {path} is corrupted: {rel} does not match its recorded sha256")


def verified_train_meta(model_dir: str | Path) -> TrainMeta | None:
    """read_train_meta, with every file the record lists checked against its sha256 (an edited
    validation.jsonl would silently change what optimize selects on); None for a dir `millis train`
    (distill, prune) did not write."""
    meta = read_train_meta(model_dir)
    if meta is not None:
        verify_files(Path(model_dir), meta, "model directory")
    return meta
