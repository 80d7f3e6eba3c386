"""The millis cache holds compiled kernels (code millis loads) and models: a cache folder another user can write is
refused, a new one is private, and a kernel someone else could have written is built again, never loaded. Files
from elsewhere are written over, not through, a planted symlink, and a distilled student does not copy what a
source folder's symlinks point to."""
from __future__ import annotations

import os

import pytest

from millis.common.errors import MillisError
from millis.common.files import cache_dir, copy_regular, replace_text


def test_a_cache_others_can_write_is_refused_and_a_new_one_is_private(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("MILLIS_CACHE", str(shared))
    with pytest.raises(MillisError, match="can be written by another user"):
        cache_dir()
    monkeypatch.setenv("MILLIS_CACHE", str(tmp_path / "new"))
    assert cache_dir().stat().st_mode & 0o777 == 0o700


def test_a_kernel_others_could_write_is_built_again(tmp_path, monkeypatch):
    from millis.kernels.native import build

    monkeypatch.setenv("MILLIS_CACHE", str(tmp_path / "cache"))
    build.__wrapped__("pool", ("pool.c",), "scalar")
    so, = (tmp_path / "cache" / "kernels").glob("pool-scalar-*.so")
    planted = so.with_name("planted")  # a new file under its name: the loaded one is mapped, and truncating a
    planted.write_bytes(b"planted")    # mapped library in place ends the process with SIGBUS
    planted.chmod(0o666)               # as another user would leave it: anyone may write it
    os.replace(planted, so)
    build.__wrapped__("pool", ("pool.c",), "scalar")  # loads: it was built again (b"planted" does not load)
    assert so.read_bytes().startswith(b"\x7fELF") and not so.stat().st_mode & 0o022


def test_writes_replace_a_planted_symlink_and_copies_leave_links_out(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("AWS_SECRET_ACCESS_KEY=x")
    link = tmp_path / "report.html"
    os.symlink(secret, link)
    replace_text(link, "<html>")
    assert secret.read_text() == "AWS_SECRET_ACCESS_KEY=x" and not link.is_symlink() and link.read_text() == "<html>"
    src = tmp_path / "1_Pooling"
    src.mkdir()
    (src / "config.json").write_text("{}")
    os.symlink(secret, src / "README.md")
    copy_regular(src, tmp_path / "out" / "1_Pooling")
    assert sorted(p.name for p in (tmp_path / "out" / "1_Pooling").iterdir()) == ["config.json"]
