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


def test_tsv_quotes_are_text_not_quoting(tmp_path):
    """GLUE-style TSV has no quoting: an unbalanced '"' is part of the text, never merges lines into one row."""
    p = tmp_path / "d.tsv"
    p.write_text('text\tlabel\n"a gem\t1\nplain\t0\nit is "fine" really\t1\n', encoding="utf-8")
    d = read_labeled(p)
    assert d.texts == ('"a gem', "plain", 'it is "fine" really') and d.labels == ("1", "0", "1")
    assert d.lines == (2, 3, 4)


def test_rows_with_more_or_fewer_fields_than_the_header_name_the_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nmy card,lost_card\nI lost my card, please help,lost_card\n")
    with pytest.raises(MillisError, match=r"d\.csv: line 3 has 3 field\(s\) but the header has 2 \(text, label\); "
                                          r"quote a text that holds a comma"):
        read_labeled(p)
    q = tmp_path / "e.tsv"
    q.write_text("text\tlabel\nok\tx\nno label here\n")
    with pytest.raises(MillisError, match=r"e\.tsv: line 3 has 1 field\(s\) but the header has 2 \(text, label\)$"):
        read_labeled(q)
    t = tmp_path / "f.tsv"
    t.write_text("text\tlabel\na\tb\tc\n")
    with pytest.raises(MillisError, match=r"line 2 has 3 field\(s\).*must not hold a tab"):
        read_labeled(t)


@pytest.mark.parametrize("value, shown", [(["x", "y"], r'\["x", "y"\]'), ({"a": 1}, r'\{"a": 1\}'),
                                          (True, "true"), (None, "null"), (float("nan"), "NaN"),
                                          (float("inf"), "Infinity")])
def test_jsonl_label_that_is_not_a_string_or_number_names_line_and_column(tmp_path, value, shown):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps({"text": "b", "label": value}) + "\n")
    with pytest.raises(MillisError, match=rf"d\.jsonl: line 2, column 'label': {shown} is not a string or a number"):
        read_labeled(p)


def test_whole_number_float_labels_are_integers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}", "label": y}) + "\n" for i, y in enumerate([1, 1.0, 0, 2.5])))
    d = read_labeled(p)
    assert d.labels == ("1", "1", "0", "2.5") and d.classes == ["0", "1", "2.5"]


def test_classes_of_digit_like_labels_that_are_not_numbers(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,\u00b2\nb,1\nc,--1\nd,2\n", encoding="utf-8")  # '²'.isdigit() but int('²') fails
    assert read_labeled(p).classes == sorted(["\u00b2", "1", "--1", "2"])
    q = tmp_path / "e.csv"
    q.write_text("text,label\na,--1\nb,1\n")  # '--1'.lstrip('-') is decimal, int('--1') is not a number
    assert read_labeled(q).classes == ["--1", "1"]


def test_a_json_array_file_says_json_lines_are_expected(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], indent=1))
    with pytest.raises(MillisError, match=r"d\.json is a JSON array: millis reads JSON Lines \(one JSON object per"):
        read_labeled(p)
    p.write_text(json.dumps([{"text": "a", "label": "x"}]))  # on one line too
    with pytest.raises(MillisError, match="is a JSON array: millis reads JSON Lines"):
        read_labeled(p)


def test_a_header_naming_a_column_read_twice_is_refused(tmp_path):
    """csv.DictReader keeps the last of two columns with one name: training read the wrong labels, without a word.
    Repeated names of columns nothing reads (a spreadsheet's blank header cells) are fine."""
    from millis.common.readers import read_column

    p = tmp_path / "d.csv"
    p.write_text("text,label,label\nhello,a,b\n")
    with pytest.raises(MillisError, match=r"d\.csv: the header names column 'label' 2 times"):
        read_labeled(p)
    p.write_text("text,text,label\nhello,hi,b\n")
    with pytest.raises(MillisError, match=r"the header names column 'text' 2 times"):
        read_column(p, "text")
    p.write_text("text,label,,,notes,notes\nhello,a,,,x,y\nbye,b,,,z,w\n")
    assert read_labeled(p).labels == ("a", "b") and read_column(p, "text") == ["hello", "bye"]


def test_a_line_is_one_text_whatever_characters_it_holds(tmp_path):
    import io

    from millis.cli.artifact import stdin_texts
    from millis.common.readers import read_labeled, read_texts

    raw = "first\x0cstill first\u2028and\x1c more\nsecond\x85line\r\nthird\rfourth\n"
    f = tmp_path / "t.txt"
    f.write_text(raw, encoding="utf-8", newline="")
    want = ["first\x0cstill first\u2028and\x1c more", "second\x85line", "third", "fourth"]
    assert read_texts(f) == want  # str.splitlines gave 7 texts, pieces of lines
    assert stdin_texts(io.BytesIO(raw.encode())) == want
    j = tmp_path / "cr.jsonl"  # old Mac line ends: \r alone
    j.write_text('{"text": "a\\u2028b", "label": "x"}\r{"text": "c", "label": "y"}\r', newline="")
    rows = read_labeled(j)
    assert rows.texts == ("a\u2028b", "c") and rows.labels == ("x", "y")
