"""read_labeled: CSV / TSV / JSONL into texts and labels; every error names the file line."""
import json

import pytest

from millis.common.errors import MillisError
from millis.common.readers import read_labeled


def test_crlf_csv_with_quoted_comma(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b'text,label\r\n"hello, world",positive\r\nwhere is my card?,negative\r\n')
    d = read_labeled(p)
    assert d.texts == ("hello, world", "where is my card?")
    assert d.labels == ("positive", "negative")  # no stray \r on the last column
    assert d.lines == (2, 3) and d.label_col == "label" and len(d) == 2


def test_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tintent\ncard lost, help\tcard\nrefund?\trefund\n", encoding="utf-8")
    d = read_labeled(tsv)
    assert d.texts == ("card lost, help", "refund?") and d.labels == ("card", "refund") and d.label_col == "intent"
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "ok", "label": 1}) + "\n\n" + json.dumps({"text": "Hi", "label": 0}) + "\n")
    d = read_labeled(jl)
    assert d.texts == ("ok", "Hi") and d.labels == ("1", "0") and d.lines == (1, 3)


def test_label_column_auto_pick_and_limit(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("id,text,category\n1,a,x\n2,b,y\n3,c,x\n")
    d = read_labeled(p, limit=2)
    assert d.label_col == "category" and d.labels == ("x", "y") and d.texts == ("a", "b")
    # a single other column is taken as the label; two unknown ones are ambiguous
    q = tmp_path / "e.csv"
    q.write_text("text,tag\na,x\n")
    assert read_labeled(q).label_col == "tag"
    r = tmp_path / "f.csv"
    r.write_text("text,tag,source\na,x,web\n")
    with pytest.raises(MillisError, match=r"cannot tell which column.*columns: text, tag, source"):
        read_labeled(r)


def test_numeric_labels_sort_as_numbers(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{y}\n" for i, y in enumerate([10, 2, 1, 2, 0])))
    assert read_labeled(p).classes == ["0", "1", "2", "10"]
    q = tmp_path / "e.csv"
    q.write_text("text,label\na,b\nc,a\nd,10\n")
    assert read_labeled(q).classes == ["10", "a", "b"]  # mixed: plain string order


def test_missing_column_lists_the_columns(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("sentence,label\nhi,x\n")
    with pytest.raises(MillisError, match=r"no column 'text' \(columns: sentence, label\)"):
        read_labeled(p)
    with pytest.raises(MillisError, match=r"no column 'intent' \(columns: sentence, label\).*--label-col"):
        read_labeled(p, text_col="sentence", label_col="intent")


def test_empty_text_and_missing_label_name_the_lines(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\ngood,x\n   ,y\nfine,x\n,x\n")
    with pytest.raises(MillisError, match=r"2 row\(s\) with empty text, at line\(s\) 3, 5"):
        read_labeled(p)
    q = tmp_path / "e.jsonl"
    q.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n{"text": "c", "label": " "}\n')
    with pytest.raises(MillisError, match=r"2 row\(s\) with no label, at line\(s\) 2, 3"):
        read_labeled(q)


def test_many_bad_rows_are_summarised(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "a,\n" * 11)
    with pytest.raises(MillisError, match=r"11 row\(s\) with no label, at line\(s\) 2, 3, 4, 5, 6, 7, 8, 9 and 3 more"):
        read_labeled(p)


def test_non_utf8_byte_names_its_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text,label\ncaf\xc3\xa9,x\nok,y\ncaf\xe9,x\n")  # line 4 is Latin-1
    with pytest.raises(MillisError, match=r"line 4 is not valid UTF-8 \(byte 0xe9\)"):
        read_labeled(p)


def test_bad_json_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(MillisError, match="line 2 is not valid JSON"):
        read_labeled(p)
    p.write_text('{"text": "a", "label": "x"}\n["b", "y"]\n')
    with pytest.raises(MillisError, match="line 2 is not a JSON object"):
        read_labeled(p)


def test_unsupported_missing_and_empty_files(tmp_path):
    p = tmp_path / "d.xlsx"
    p.write_text("x")
    with pytest.raises(MillisError, match=r"unsupported file type \.xlsx; use one of \.csv"):
        read_labeled(p)
    with pytest.raises(MillisError, match="data file not found"):
        read_labeled(tmp_path / "nope.csv")
    e = tmp_path / "e.csv"
    e.write_text("text,label\n")
    with pytest.raises(MillisError, match="has no data rows"):
        read_labeled(e)


def test_unicode_line_separators_stay_inside_a_text(tmp_path):
    """Only \\n ends a record: U+2028 or a form feed inside a text (json.dumps(ensure_ascii=False)
    writes them raw) must not split it."""
    jl = tmp_path / "d.jsonl"
    rows = [{"text": "first\u2028second", "label": "a"}, {"text": "x\x0cy", "label": "b"}]
    jl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    d = read_labeled(jl)
    assert d.texts == ("first\u2028second", "x\x0cy") and d.lines == (1, 2)
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nfirst\u2028second,a\nok,b\n", encoding="utf-8")
    d = read_labeled(csv)
    assert d.texts == ("first\u2028second", "ok") and d.lines == (2, 3)


def test_upper_case_extension_reads_its_own_format(tmp_path):
    p = tmp_path / "D.TSV"
    p.write_text("text\tlabel\nhello, world\tx\n")
    d = read_labeled(p)
    assert d.texts == ("hello, world",) and d.labels == ("x",)


def test_read_texts_takes_the_text_column_of_jsonl(tmp_path):
    from millis.common.readers import read_texts

    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "where is my card?", "label": "x"}\n\n{"text": " "}\n{"text": "refund?"}\n')
    assert read_texts(p) == ["where is my card?", "refund?"]
    with pytest.raises(MillisError, match=r"no column 'body' \(columns: text, label\)"):
        read_texts(p, "body")
