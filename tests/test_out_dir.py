"""`--out` is replaced only when it is empty or a directory millis wrote, and never when it is, holds or lies
inside what the command reads (`millis optimize models/clf --out models` used to delete the source, `millis
train --out data` the training data)."""
import json
import shutil

import pytest
import torch

from millis.artifact import store
from millis.cli.main import main
from millis.common.errors import MillisError

from test_artifact_meta import V1_TRAIN, sample_meta


def fill(d):
    (d / "model.onnx").write_bytes(b"weights")
    return sample_meta()


def test_only_an_empty_directory_or_one_millis_wrote_is_replaced(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("text,label\nmy card,bank\n")
    with pytest.raises(MillisError, match=r"^--out .*data is a directory that millis did not write"):
        store.write(data, fill)
    assert [p.name for p in tmp_path.iterdir()] == ["data"] and (data / "train.csv").is_file()  # untouched, no temp
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MillisError, match=r"^--out .*notes.txt is a file"):
        store.write(tmp_path / "notes.txt", fill)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert store.write(empty, fill) == empty and store.read_meta(empty).files
    store.write(empty, fill)  # now an artifact: replaced
    trained = tmp_path / "trained"  # a model dir of `millis train`, of a format version this millis cannot read
    trained.mkdir()
    (trained / "model.safetensors").write_bytes(b"w")
    (trained / "millis.json").write_text(json.dumps(dict(V1_TRAIN, version=9)))
    store.write(trained, fill)
    assert store.read_meta(trained).task == "embed" and not (trained / "model.safetensors").exists()


def test_a_symlinked_out_writes_where_it_points(tmp_path):
    target = tmp_path / "v3"
    store.write(target, fill)
    (tmp_path / "current").symlink_to(target)
    store.write(tmp_path / "current", fill)  # renamed the link itself before: a stale .current.old-* link
    assert (tmp_path / "current").is_symlink() and store.read_meta(tmp_path / "current").files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v3"]


def test_an_artifact_is_readable_by_others_as_the_umask_says_and_an_unwritable_out_fails_first(tmp_path):
    """mkdtemp makes 0700 and safetensors 0600: another user (a service account) could not serve the artifact. And
    an --out whose directory cannot be written failed only at the end, after the whole optimize."""
    import os
    import stat

    def fill_private(d):
        (d / "weights.bin").write_bytes(b"w")
        (d / "weights.bin").chmod(0o600)
        return fill(d)

    old = os.umask(0o022)
    try:
        art = store.write(tmp_path / "art", fill_private)
    finally:
        os.umask(old)
    assert stat.S_IMODE(art.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in art.iterdir()} == {0o644}
    with pytest.raises(MillisError, match=r"--out /proc/millis-art/x: cannot write in /proc"):
        store.check_out("/proc/millis-art/x")


@pytest.mark.parametrize("out", ["models", "models/clf", "models/clf/art"])
def test_out_is_never_the_source_nor_holds_it_nor_lies_inside_it(tmp_path, out):
    src = tmp_path / "models" / "clf"
    src.mkdir(parents=True)
    (src / "millis.json").write_text(json.dumps(V1_TRAIN))  # a directory millis wrote: only the source rule refuses
    (src / "model.safetensors").write_bytes(b"w")
    what = {"models": "contains", "models/clf": "is", "models/clf/art": "is inside"}[out]
    with pytest.raises(MillisError, match=rf"^--out .*{out} {what} .*clf, which this command reads"):
        store.write(tmp_path / out, fill, keep=(src, ""))
    assert sorted(p.name for p in src.iterdir()) == ["millis.json", "model.safetensors"]


def test_commands_refuse_their_source_or_data_as_out_before_any_work(tmp_path, trained_classifier, topics_data,
                                                                     capsys):
    src = tmp_path / "models" / "clf"
    shutil.copytree(trained_classifier, src)
    before = sorted(p.name for p in src.iterdir())
    quick = ["--preset", "quick", "--threads", "1"]
    assert main(["optimize", str(src), "--task", "classify", "--out", str(src), *quick, "--variants",
                 "ort-fp32-fused", "--no-recover"]) == 2
    assert "--out" in capsys.readouterr().err and sorted(p.name for p in src.iterdir()) == before
    assert main(["optimize", str(src), "--task", "classify", "--out", str(tmp_path / "models"), *quick,
                 "--variants", "ort-fp32-fused", "--no-recover"]) == 2
    assert "contains" in capsys.readouterr().err and sorted(p.name for p in src.iterdir()) == before
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(topics_data["train"], data / "train.csv")
    threads = torch.get_num_threads()
    try:
        assert main(["train", "tiny:bert", "--data", str(data / "train.csv"), "--out", str(data), *quick,
                     "--limit", "48"]) == 2
        assert "--out" in capsys.readouterr().err and (data / "train.csv").is_file()
        for command in ("distill", "prune"):
            extra = ["--heads", "0.5"] if command == "prune" else ["--layers", "1"]
            assert main([command, str(src), "--data", str(topics_data["train"]), "--out", str(src / "sub"),
                         *quick, *extra]) == 2
            assert "is inside" in capsys.readouterr().err and sorted(p.name for p in src.iterdir()) == before
    finally:
        torch.set_num_threads(threads)
