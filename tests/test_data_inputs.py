"""Loaders on input a new user really has: empty files, non-UTF-8 text, files without ids."""

from __future__ import annotations

import csv
import json
import re

import pytest

from sparcom_jax.data import DataWarning, load_instructions

ROWS = [
    {"category": "math", "instruction": "Add 2 and 3.", "output": "5"},
    {"category": "code", "instruction": "Reverse a string.", "output": "s[::-1]"},
    {"category": "QA", "instruction": "Capital of France?", "output": "Paris."},
]


def write_jsonl(path, rows, blank_after_first=False):
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# --- nothing to load is an error naming the file -------------------------------


def _write_empty_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: pa.array([], pa.string()) for k in ("id", "category", "instruction", "output")}),
                   path)


@pytest.mark.parametrize("name, content, what", [
    ("empty.jsonl", "", "the file is empty"),
    ("blank.jsonl", "\n  \n\n", "the file has only blank lines"),
    ("empty.json", "", "the file is empty"),
    ("list.json", " [ ]\n", "an empty JSON list"),
    ("empty.csv", "", "the file is empty"),
    ("header.csv", "id,category,instruction,output\n", "only the header line"),
    ("blank.tsv", "\n\n", "the file has only blank lines"),
    ("none.parquet", None, "a Parquet file with 0 rows"),
])
@pytest.mark.parametrize("lenient", [False, True])
def test_a_file_with_no_records_is_an_error_naming_it(tmp_path, name, content, what, lenient):
    p = tmp_path / name
    if content is None:
        _write_empty_parquet(p)
    else:
        p.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_instructions(p, lenient=lenient)
    assert str(e.value).startswith(f"{p}: no records ({what}")
    assert "add records to it" in str(e.value)


def test_an_empty_file_among_good_ones_is_still_named(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [dict(r, id=f"g{i}") for i, r in enumerate(ROWS)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no records")):
        load_instructions([good, empty])


def test_lenient_load_with_every_record_invalid_is_an_error(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text("{oops\n" + json.dumps(dict(ROWS[0], category="maths?!")) + "\n", encoding="utf-8")
    with pytest.warns(DataWarning, match="skipped 2 invalid record"), pytest.raises(ValueError) as e:
        load_instructions(p, lenient=True)
    msg = str(e.value)
    assert msg.startswith(f"{p}: no usable records (2 row(s) read, 2 invalid); fix the invalid records")
    assert f"(first: {p}:1: malformed JSON" in msg


def test_a_filter_that_keeps_nothing_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [dict(r, id=f"a{i}") for i, r in enumerate(ROWS)])
    with pytest.raises(ValueError) as e:
        load_instructions(p, categories=["SUM"])
    msg = str(e.value)
    assert msg.startswith(f"{p}: no usable records (3 row(s) read, 3 excluded); check categories=")
    assert f"first excluded: {p}:1: category 'math' not in categories=" in msg


# --- text that is not UTF-8 -----------------------------------------------------


def test_latin1_json_lines_name_the_line_and_column(tmp_path):
    p = tmp_path / "latin.jsonl"
    good = json.dumps(dict(ROWS[0], id="a")).encode()
    bad = '{"id": "b", "category": "math", "instruction": "caf\u00e9", "output": "x"}'.encode("latin-1")
    p.write_bytes(good + b"\n" + bad + b"\n")
    column = bad.index(b"\xe9") + 1
    for lenient in (False, True):  # a decoding problem is the whole file's, in both modes
        with pytest.raises(ValueError) as e:
            load_instructions(p, lenient=lenient)
        assert str(e.value).startswith(
            f"{p}:2: not UTF-8 text (byte 0xe9 at column {column}); save the file as UTF-8")


def test_latin1_csv_names_the_line(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("id,category,instruction,output\na,math,Add.,5\n\nb,code,Cr\u00e8me,x\n".encode("latin-1"))
    with pytest.raises(ValueError) as e:
        load_instructions(p)
    assert str(e.value).startswith(f"{p}:4: not UTF-8 text (byte 0xe8 at column 10); save the file as UTF-8")


# --- files without ids ------------------------------------------------------------


def test_jsonl_without_ids_gets_file_and_line_ids(tmp_path):
    p = write_jsonl(tmp_path / "mine.jsonl", ROWS, blank_after_first=True)
    recs = load_instructions(p)
    assert [r.id for r in recs] == ["mine:1", "mine:3", "mine:4"]  # the blank line 2 still counts
    assert [r.instruction for r in recs] == [r["instruction"] for r in ROWS]
    assert load_instructions(p) == recs  # the same on every run


def test_derived_ids_do_not_depend_on_sampling(tmp_path):
    rows = [{"category": c, "instruction": f"{c} {i}", "output": "x"} for c in ("math", "code") for i in range(6)]
    p = write_jsonl(tmp_path / "pool.jsonl", rows)
    by_text = {r.instruction: r.id for r in load_instructions(p)}
    for seed in (0, 1):
        sample = load_instructions(p, n_per_category=2, seed=seed)
        assert sample and all(r.id == by_text[r.instruction] for r in sample)
    line = {r["instruction"]: n for n, r in enumerate(rows, start=1)}
    assert all(v == f"pool:{line[k]}" for k, v in by_text.items())


def test_other_formats_without_ids(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(ROWS), encoding="utf-8")
    assert [r.id for r in load_instructions(arr)] == ["arr:item 1", "arr:item 2", "arr:item 3"]

    rows = [dict(r) for r in ROWS]
    rows[0]["instruction"] = "two\nlines"  # row 1 spans lines 2-3
    assert [r.id for r in load_instructions(write_csv(tmp_path / "t.csv", rows))] == ["t:2", "t:4", "t:5"]

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    assert [r.id for r in load_instructions(tmp_path / "p.parquet")] == ["p:row 1", "p:row 2", "p:row 3"]

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(tmp_path / "dd"))
    assert [r.id for r in load_instructions(tmp_path / "dd")] == ["dd:train row 1", "dd:train row 2",
                                                                  "dd:test row 1"]


def test_same_named_files_without_ids_collide_with_a_clear_fix(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_jsonl(tmp_path / "a" / "data.jsonl", ROWS)
    b = write_jsonl(tmp_path / "b" / "data.jsonl", ROWS[:1])
    with pytest.raises(ValueError) as e:
        load_instructions([a, b])
    assert str(e.value) == (f"{b}:1: duplicate id 'data:1' (first seen at {a}:1); ids made from the file "
                            "name collide: rename one of the files, or give the records an 'id' column")


def test_explicit_duplicate_ids_name_both_lines(tmp_path):
    rows = [dict(r, id=f"x{i}") for i, r in enumerate(ROWS)]
    rows[2]["id"] = "x0"
    p = write_jsonl(tmp_path / "dup.jsonl", rows, blank_after_first=True)
    with pytest.raises(ValueError) as e:
        load_instructions(p)
    assert str(e.value) == f"{p}:4: duplicate id 'x0' (first seen at {p}:1); give each record a unique id"


def test_an_id_column_with_a_row_missing_its_id_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "part.jsonl", [dict(ROWS[0], id="a"), ROWS[1]])
    with pytest.raises(ValueError) as e:
        load_instructions(p)
    assert str(e.value).startswith(f"{p}:2: missing required field 'id'; give this record an 'id', "
                                   "or leave 'id' out of every record")


def test_adapters_keep_their_own_ids(tmp_path):
    p = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "2"}])
    assert [r.id for r in load_instructions(p, adapter="gsm8k")] == ["gsm8k-gsm-1"]
