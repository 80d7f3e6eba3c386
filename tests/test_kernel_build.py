"""millis.kernels.native.build: each source compiled to an object of its own, at once, cached by its text, the
headers' and the flags, shared between libraries, linked; a compile error names the source; a file or folder another
user could have written is never loaded (built again, or refused); a damaged object is built again; builds started
together build once."""
from __future__ import annotations

import ctypes
import os
import threading

import pytest

from millis.common.errors import MillisError
from millis.kernels import native

SOURCES = {"a.c": '#include "k.h"\nAPI int add_k(int x) { return x + K; }\n',
           "b.c": '#include "k.h"\nAPI int twice(int x) { return 2 * x; }\n',
           "c.c": '#include "k.h"\nAPI int thrice(int x) { return 3 * x + K - K; }\n'}


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    """A folder of sources in place of millis's kernels, a fresh cache, and the compile jobs each build ran."""
    src = tmp_path / "src"
    src.mkdir()
    for name, text in SOURCES.items():
        (src / name).write_text(text)
    (src / "k.h").write_text('#define K 40\n#define API __attribute__((visibility("default")))\n')
    monkeypatch.setattr(native, "HERE", src)
    monkeypatch.setenv("MILLIS_CACHE", str(tmp_path / "cache"))
    jobs: list[list[str]] = []
    compile_objects = native.compile_objects

    def record(cc, flags, isa, todo):
        jobs.append(sorted(s for s, _ in todo))
        return compile_objects(cc, flags, isa, todo)

    monkeypatch.setattr(native, "compile_objects", record)
    return src, tmp_path / "cache" / "kernels", jobs


def build(name: str, sources: tuple[str, ...]) -> ctypes.CDLL:
    return native.build.__wrapped__(name, sources, "scalar")  # (past functools.cache: each call builds or reuses)


def test_objects_are_compiled_once_and_shared(kernels):
    src, cache, jobs = kernels
    lib = build("one", ("a.c", "b.c"))
    assert (lib.add_k(2), lib.twice(5)) == (42, 10)
    other = build("two", ("a.c", "c.c"))  # a.c's object is the first library's
    assert (other.add_k(1), other.thrice(3)) == (41, 9)
    assert jobs == [["a.c", "b.c"], ["c.c"]]
    assert len(list((cache / "obj").glob("*.o"))) == 3 and len(list(cache.glob("*.so"))) == 2
    build("one", ("a.c", "b.c"))  # the library as built: nothing compiled, nothing linked
    assert len(jobs) == 2
    (src / "k.h").write_text('#define K 7\n#define API __attribute__((visibility("default")))\n')
    assert build("one", ("a.c", "b.c")).add_k(2) == 9  # a header changed: every object built again
    assert jobs[-1] == ["a.c", "b.c"]
    assert {oct(p.stat().st_mode & 0o777) for p in [cache, cache / "obj"]} == {"0o700"}


def test_a_compile_error_names_its_source_and_leaves_nothing(kernels):
    src, cache, jobs = kernels
    (src / "bad.c").write_text("int broken( {\n")
    with pytest.raises(MillisError, match=r"building the scalar kernels failed: bad\.c: .*error"):
        build("bad", ("a.c", "bad.c"))
    assert not list(cache.glob("*.so")) and [p.name.split("-")[0] for p in (cache / "obj").glob("*.o")] == ["a"]
    assert build("good", ("a.c",)).add_k(0) == 40 and jobs[-1] == []  # a.c's object kept, reused


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="no uids here")
def test_files_others_could_write_are_not_loaded(kernels):
    src, cache, jobs = kernels
    build("one", ("a.c", "b.c"))
    obj = next((cache / "obj").glob("a-*.o"))
    so = next(cache.glob("one-*.so"))
    for p in (obj, so):
        p.chmod(0o666)  # as if another user had put (or could change) them there
    assert build("one", ("a.c", "b.c")).twice(4) == 8
    assert jobs[-1] == ["a.c"] and not obj.stat().st_mode & 0o002 and not so.stat().st_mode & 0o002
    (cache / "obj").chmod(0o777)
    try:
        with pytest.raises(MillisError, match="can be written by another user"):
            build("one", ("a.c", "b.c"))
    finally:
        (cache / "obj").chmod(0o700)


def test_a_damaged_object_is_built_again(kernels):
    """An empty object (a crash before it reached the disk) is not reused; one whose bytes are damaged fails the link,
    and the build compiles every object anew, once."""
    src, cache, jobs = kernels
    build("one", ("a.c", "b.c"))
    a = next((cache / "obj").glob("a-*.o"))
    b = next((cache / "obj").glob("b-*.o"))
    a.write_bytes(b"")
    so = next(cache.glob("one-*.so"))
    so.unlink()
    assert build("one", ("a.c", "b.c")).add_k(1) == 41 and jobs[-1] == ["a.c"]
    b.write_bytes(b"not an object file")
    so.unlink()
    assert build("one", ("a.c", "b.c")).twice(21) == 42
    assert jobs[-2:] == [[], ["a.c", "b.c"]]  # nothing to compile, the link failed: all anew


def test_builds_started_together_build_once(kernels):
    src, cache, jobs = kernels
    libs: list = []
    threads = [threading.Thread(target=lambda: libs.append(build("one", ("a.c", "b.c")))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [lib.add_k(2) for lib in libs] == [42] * 3
    assert sorted(map(sorted, jobs)) == [["a.c", "b.c"]]  # one build compiled; the others waited, then reused it


def test_a_cache_without_locks_still_builds_and_loads(kernels, monkeypatch):
    """A library already built loads without taking the lock (a read-only cache: its lock file cannot be opened); a
    cache whose lock cannot be opened, or whose file system has no locks, builds without one, saying so."""
    import errno

    said: list[str] = []

    class Log:  # (the module's logger as the tests see it, whatever logging an earlier test configured)
        @staticmethod
        def warning(msg, *args):
            said.append(msg % args)

    monkeypatch.setattr(native, "log", Log)
    src, cache, jobs = kernels
    build("one", ("a.c", "b.c"))
    (cache / "obj" / ".lock").unlink()
    (cache / "obj" / ".lock").mkdir()  # opening it to append fails, as on a read-only mount
    assert build("one", ("a.c", "b.c")).add_k(0) == 40 and len(jobs) == 1 and not said
    assert build("two", ("c.c",)).thrice(1) == 3 and "no build lock" in said[-1]
    (cache / "obj" / ".lock").rmdir()

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(native.fcntl, "flock", no_locks)
    assert build("three", ("b.c",)).twice(2) == 4 and "No locks available" in said[-1]
