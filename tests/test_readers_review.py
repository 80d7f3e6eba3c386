"""Review 2026-12-06 of the labelled-file readers: one rule for whole-number labels in every format, a TSV that a
CSV writer quoted, and a file whose separator is not its suffix's."""
import json

import pytest

from millis.common.errors import MillisError
from millis.common.readers import read_labeled, read_texts


def test_a_whole_number_label_reads_alike_in_every_format(tmp_path):
    csv = tmp_path / "f.csv"
    csv.write_text("text,label\na,1.0\nb,0.0\nc,2\nd,10.00\ne,1.5\n")
    tsv = tmp_path / "f.tsv"
    tsv.write_text("text\tlabel\na\t1.0\nb\t0\nc\t2.0\nd\t10\ne\t1.5\n")
    jl = tmp_path / "f.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                          for t, y in zip("abcde", [1.0, 0, "2.0", 10, "1.5"])))
    for f in (csv, tsv, jl):
        d = read_labeled(f)
        assert d.labels == ("1", "0", "2", "10", "1.5"), f
    assert read_labeled(csv).classes == ["0", "1", "1.5", "10", "2"]  # not all integers: text order
    from millis.common.readers import label_order  # the order of classes, for eval's per-class report too

    assert label_order(["10", "2", "-1"]) == ["-1", "2", "10"]


def test_a_tsv_quoted_by_a_csv_writer_is_an_error_that_says_so(tmp_path):
    p = tmp_path / "q.tsv"
    p.write_text('text\tlabel\n"he said ""hi"""\t0\nplain\t1\n')
    for read in (read_labeled, read_texts):
        with pytest.raises(MillisError, match=r"q\.tsv: line 2, column 'text' is quoted as a CSV writer quotes .*"
                                              r"millis reads \.tsv files unquoted"):
            read(p)
    ok = tmp_path / "ok.tsv"  # GLUE's own quotes are text
    ok.write_text('text\tlabel\n"a quote" she said\t0\n"whole"\t1\n')
    assert read_labeled(ok).texts == ('"a quote" she said', '"whole"')


@pytest.mark.parametrize("name, body, looks", [("t.csv", "text\tlabel\nhi\ta\n", "tab-separated.*name it \\.tsv"),
                                               ("s.csv", "text;label\nhi;a\n", "semicolon-separated.*re-save"),
                                               ("c.tsv", "text,label\nhi,a\n", "comma-separated.*name it \\.csv")])
def test_a_one_column_header_holding_another_separator_says_what_the_file_looks_like(tmp_path, name, body, looks):
    p = tmp_path / name
    p.write_text(body)
    for read in (read_labeled, read_texts):
        with pytest.raises(MillisError, match=f"has no column 'text': its header is one column, .* the file looks "
                                              f"{looks}"):
            read(p)
