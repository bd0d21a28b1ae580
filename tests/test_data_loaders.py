"""Loaders: every file format, field mapping, bad input, lenient mode, sampling."""

from __future__ import annotations

import csv
import json
import re
import warnings

import pytest

from sparcom_jax.categories import CATEGORIES
from sparcom_jax.data import (
    DataWarning,
    LoadReport,
    Record,
    count_by_category,
    load_instructions,
    sample_balanced,
)

ROWS = [
    {"id": "r1", "category": "math", "instruction": "Add 2 and 3.", "input": "", "output": "5", "source": "human"},
    {"id": "r2", "category": "CODE", "instruction": "Reverse a string in Python.", "input": "s = 'abc'", "output": "s[::-1]", "source": "human"},
    {"id": "r3", "category": "QA", "instruction": "What is the capital of France?", "input": "", "output": "Paris.", "source": "generated"},
]
EXPECTED = [
    Record("r1", "math", "Add 2 and 3.", "", "5", "human"),
    Record("r2", "code", "Reverse a string in Python.", "s = 'abc'", "s[::-1]", "human"),
    Record("r3", "general_qa", "What is the capital of France?", "", "Paris.", "generated"),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows, fieldnames=None):
    fieldnames = fieldnames or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)
    return path


# --- formats -----------------------------------------------------------------


def test_jsonl(tmp_path):
    assert load_instructions(write_jsonl(tmp_path / "a.jsonl", ROWS)) == EXPECTED


def test_json_array(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
    assert load_instructions(p) == EXPECTED


def test_json_file_holding_json_lines(tmp_path):
    assert load_instructions(write_jsonl(tmp_path / "a.json", ROWS)) == EXPECTED


def test_jsonl_file_holding_one_json_list(tmp_path):
    # json.dump(records, f) under a .jsonl name: every line was "malformed JSON" ("mine.jsonl:1:
    # malformed JSON (Expecting value at column 2) ... (11 more invalid record(s) ...)").
    p = tmp_path / "mine.jsonl"
    p.write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
    assert load_instructions(p) == EXPECTED
    p.write_text(json.dumps([{k: v for k, v in r.items() if k != "id"} for r in ROWS]), encoding="utf-8")
    assert [r.id for r in load_instructions(p)] == ["mine:item 1", "mine:item 2", "mine:item 3"]
    p.write_text(json.dumps([ROWS[0], 7]), encoding="utf-8")  # a list item that is no record: named as in a .json
    with pytest.raises(ValueError, match=r"mine\.jsonl:item 2: expected a JSON object, got int"):
        load_instructions(p)
    p.write_text("[" + json.dumps(ROWS[0]) + "\n", encoding="utf-8")  # an unclosed list: its line, as before
    with pytest.raises(ValueError, match=r"mine\.jsonl:1: malformed JSON"):
        load_instructions(p)


def test_csv_with_numeric_ids_empty_cells_and_multiline(tmp_path):
    rows = [dict(r, id=str(i)) for i, r in enumerate(ROWS, start=1)]
    rows[0]["instruction"] = "Add 2 and 3.\nShow your work."
    recs = load_instructions(write_csv(tmp_path / "a.csv", rows))
    assert [r.id for r in recs] == ["1", "2", "3"]
    assert recs[0].instruction == "Add 2 and 3.\nShow your work."
    assert recs[0].input == ""  # empty cell, not "nan"
    assert recs[1].input == "s = 'abc'"


def test_csv_cells_are_read_as_the_text_they_hold(tmp_path):
    # A column of numbers must not become ints or floats: "007" is not "7", a reference
    # answer "0.10" is not "0.1", and a 20-digit number is not rounded.
    p = tmp_path / "nums.csv"
    p.write_text("id,category,instruction,input,output\n"
                 "007,math,Add 0.05 and 0.05.,,0.10\n"
                 "010,math,Write 12 with one decimal.,1e3,12.0\n"
                 "011,math,Square 111111111.,,12345678987654321000\n"
                 "012,classification,Is 7 prime?,,True\n", encoding="utf-8")
    recs = load_instructions(p)
    assert [(r.id, r.input, r.output) for r in recs] == [
        ("007", "", "0.10"), ("010", "1e3", "12.0"), ("011", "", "12345678987654321000"), ("012", "", "True")]


def test_csv_with_a_byte_order_mark_and_crlf(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffid,category,instruction,output\r\nx1,math,Add 1 and 1.,2\r\n".encode("utf-8"))
    assert load_instructions(p) == [Record("x1", "math", "Add 1 and 1.", "", "2")]


def test_json_lines_and_json_with_a_byte_order_mark_and_crlf(tmp_path):
    # as Windows Notepad saves "UTF-8 with BOM": the BOM was read as a JSON syntax error on line 1
    for name, text in (("bom.jsonl", "".join(json.dumps(r) + "\r\n" for r in ROWS)),
                       ("bom.json", json.dumps(ROWS, indent=1).replace("\n", "\r\n"))):
        p = tmp_path / name
        p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        assert load_instructions(p) == EXPECTED, name


def test_columns_no_record_field_reads_are_named(tmp_path):
    # Dolly's layout without the adapter: 'context' held every record's input, dropped without a word
    rows = [{k if k != "input" else "context": v for k, v in r.items()} for r in ROWS]
    p = write_jsonl(tmp_path / "ctx.jsonl", [dict(r, url="http://x") for r in rows])
    with pytest.warns(DataWarning, match=re.escape(
            "ctx.jsonl: column(s) ['context', 'url'] are not read: records take only the fields id, category, "
            "instruction, output, input, source; if it holds a record field, map it: fields={'input': 'context'}")):
        assert [r.input for r in load_instructions(p)] == ["", "", ""]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_jsonl(p, rows)
        assert load_instructions(p, fields={"input": "context"}) == EXPECTED  # mapped: read, no warning


def test_csv_with_a_repeated_column_is_an_error(tmp_path):
    p = tmp_path / "dup.csv"
    p.write_text("id,category,instruction,input,input,output\nx1,math,Add.,1 and 1,ignored?,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dup\.csv:1: column\(s\) \['input'\] appear more than once"):
        load_instructions(p)


def test_tsv(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_text("id\tcategory\tinstruction\toutput\nx\tSUM\tSummarize this.\tShort.\n", encoding="utf-8")
    assert load_instructions(p) == [Record("x", "summarization", "Summarize this.", "", "Short.")]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    assert load_instructions(p) == EXPECTED


def test_datasets_dir_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_instructions(tmp_path / "ds") == EXPECTED
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(ROWS[:2]),
        "test": datasets.Dataset.from_list([dict(ROWS[2], id="r3", category="")]),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"dd:test row 1: unknown category ''"):
        load_instructions(tmp_path / "dd")


def test_several_files_and_missing_optional_columns(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    b = write_jsonl(tmp_path / "b.jsonl", [{k: v for k, v in ROWS[1].items() if k not in ("input", "source")}])
    recs = load_instructions([a, b])
    assert [r.id for r in recs] == ["r1", "r2"]
    assert recs[1].input == "" and recs[1].source == ""


def test_field_mapping(tmp_path):
    rows = [{"uid": r["id"], "type": r["category"], "prompt": r["instruction"], "input": r["input"],
             "completion": r["output"], "source": r["source"]} for r in ROWS]
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    fields = {"id": "uid", "category": "type", "instruction": "prompt", "output": "completion"}
    assert load_instructions(p, fields=fields) == EXPECTED
    with pytest.raises(ValueError, match=r"m\.jsonl: fields maps 'output' to column 'answer'"):
        load_instructions(p, fields={**fields, "output": "answer"})


def test_category_map_and_filter(tmp_path):
    rows = [dict(ROWS[0], category="arith"), ROWS[1], ROWS[2]]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    recs, report = load_instructions(p, category_map={"arith": "math"}, categories=["MATH", "qa"],
                                     return_report=True)
    assert [r.id for r in recs] == ["r1", "r3"]
    assert [e.where for e in report.excluded] == ["2"]
    assert "code" in report.excluded[0].reason


# --- bad input: strict errors name file, line and fix --------------------------


def _error(tmp_path, lines: list[str], name="bad.jsonl", **kw) -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_instructions(p, **kw)
    return str(info.value)


def test_malformed_json_line(tmp_path):
    msg = _error(tmp_path, [json.dumps(ROWS[0]), '{"id": "r2", "category": "math" "instruction": "x"}'])
    assert re.match(r".*bad\.jsonl:2: malformed JSON \(.*column \d+\); fix the JSON syntax", msg)


def test_malformed_json_array(tmp_path):
    msg = _error(tmp_path, ["[", json.dumps(ROWS[0]) + ",", '{"id": }', "]"], name="bad.json")
    assert re.match(r".*bad\.json:3: malformed JSON .*; fix the JSON syntax", msg)


def test_unknown_category_suggests_closest(tmp_path):
    msg = _error(tmp_path, [json.dumps(ROWS[0]), json.dumps(dict(ROWS[1], category="sumarization"))])
    assert re.match(r".*bad\.jsonl:2: unknown category 'sumarization'.*did you mean 'summarization'", msg)
    assert "use one of the valid category names" in msg


def test_a_fields_key_that_is_not_a_record_field_is_refused(tmp_path):
    # fields={'inptu': 'context'} mapped the column to a field no record reads: inputs dropped
    p = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"fields: 'inptu' is not a record field \(did you mean 'input'\?\)"):
        load_instructions(p, fields={"inptu": "input"})
    assert load_instructions(p, fields={"input": "input"}) == EXPECTED


def test_a_compressed_file_says_to_decompress_it(tmp_path):
    import gzip

    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"id": "x"}\n'))
    with pytest.raises(ValueError, match=r"a\.jsonl\.gz: unsupported file type '\.gz'; decompress it first"):
        load_instructions(p)


def test_a_missing_relative_path_says_what_it_is_relative_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"data/mine.jsonl: no such file or directory (relative to the current directory, {tmp_path})")):
        load_instructions("data/mine.jsonl")


def test_a_category_given_as_a_number_is_told_categories_are_names(tmp_path):
    """`category: 3` got the list of valid names but no word on why 3 is not one; a number
    0-5 may be an index into CATEGORIES, which the message names without accepting it."""
    from sparcom_jax.categories import CATEGORIES, normalize_category

    msg = _error(tmp_path, [json.dumps(ROWS[0]), json.dumps(dict(ROWS[1], category=3))])
    assert "bad.jsonl:2: unknown category '3': categories are names, not numbers: classification (CLS)," in msg
    assert f"if 3 is an index into that list (from 0), it is {CATEGORIES[3]!r}" in msg
    assert "map your labels with category_map=" in msg  # the loader's fix still follows
    for number, index in ((0, 0), ("5", 5), (" 2.0", 2), (1.0, 1)):
        with pytest.raises(ValueError, match=f"categories are names, not numbers: .*index into that list "
                                             f"\\(from 0\\), it is '{CATEGORIES[index]}'"):
            normalize_category(number)
    for number in (6, "7", "2.5", "-1", "12"):  # no index of the six
        with pytest.raises(ValueError) as e:
            normalize_category(number)
        assert "categories are names, not numbers" in str(e.value) and "index" not in str(e.value), e.value


def test_empty_instruction(tmp_path):
    msg = _error(tmp_path, [json.dumps(dict(ROWS[0], instruction="   "))])
    assert re.match(r".*bad\.jsonl:1: empty 'instruction'; write the instruction text", msg)


def test_missing_required_field_in_one_row(tmp_path):
    row = {k: v for k, v in ROWS[1].items() if k != "output"}
    msg = _error(tmp_path, [json.dumps(ROWS[0]), "", json.dumps(row)])
    # The blank line still counts: the row is on line 3.
    assert re.match(r".*bad\.jsonl:3: missing required field 'output'; add a 'output' value, "
                    r"or map the column .* fields=\{'output'", msg)


def test_missing_required_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "category"} for r in ROWS]
    msg = _error(tmp_path, [json.dumps(r) for r in rows])
    assert "bad.jsonl: missing required column(s) ['category']" in msg
    assert "fields={'category': '<column>'}" in msg


def test_missing_required_column_csv(tmp_path):
    p = write_csv(tmp_path / "bad.csv", [{k: v for k, v in r.items() if k != "output"} for r in ROWS])
    with pytest.raises(ValueError, match=r"bad\.csv: missing required column\(s\) \['output'\]"):
        load_instructions(p)


def test_duplicate_id(tmp_path):
    msg = _error(tmp_path, [json.dumps(r) for r in (ROWS[0], ROWS[1], dict(ROWS[2], id="r1"))])
    assert re.match(r".*bad\.jsonl:3: duplicate id 'r1' \(first seen at .*bad\.jsonl:1\); "
                    r"give each record a unique id", msg)


def test_duplicate_id_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", [ROWS[1]])
    with pytest.raises(ValueError, match=r"b\.jsonl:1: duplicate id 'r2' \(first seen at .*a\.jsonl:2\)"):
        load_instructions([a, b])


def test_csv_error_names_the_line(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[0]["instruction"] = "two\nlines"  # row 1 spans lines 2-3, so row 2 starts on line 4
    rows[1]["category"] = "cod"
    p = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(ValueError, match=r"bad\.csv:4: unknown category 'cod'.*did you mean 'code'"):
        load_instructions(p)


def test_a_csv_row_of_more_or_fewer_cells_than_the_header_is_named_by_its_line(tmp_path):
    # One cell too many (an unquoted comma) was "could not be read as csv: An error occurred while
    # generating the dataset; check the file format", with no line; one too few was read with the
    # missing fields empty: MATH's record loaded without its response, and nothing said so.
    p = tmp_path / "rows.csv"
    p.write_text("id,category,instruction,input,output\n"
                 "a1,CODE,Write code,,print(1)\n"
                 "a2,MATH,What is 2+2\n"
                 "a3,QA,Why?,,Because\n"
                 "a4,QA,Who, or what?,,Nobody\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^.*rows\.csv:3: 3 cells where the header has 5; quote a cell that holds "
                                         r"',' \(\"like, this\"\), or give the row every column\n\(1 more invalid"):
        load_instructions(p)
    with pytest.warns(DataWarning, match=r"rows\.csv:5: 6 cells where the header has 5"):
        recs, report = load_instructions(p, lenient=True, return_report=True)
    assert [(r.id, r.output) for r in recs] == [("a1", "print(1)"), ("a3", "Because")]
    assert [(x.where, x.what) for x in report.skipped] == [("3", "3 cells where the header has 5"),
                                                          ("5", "6 cells where the header has 5")]


def test_a_csv_separated_by_semicolons_says_so(tmp_path):
    # Spreadsheets save CSV with ';' in many locales: every row was one cell, and the error was
    # "missing required column(s) ['category', 'instruction', 'output'] ... (columns found:
    # ['id;category;instruction;input;output'])", after pandas printed its own parser error.
    p = tmp_path / "semi.csv"
    p.write_text("id;category;instruction;input;output\na1;CODE;Write code;;print(1)\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"semi\.csv:1: the header is one column, 'id;category;instruction;input;"
                                         r"output': its columns are separated by ';', where a \.csv file's are by ',';"
                                         r" save it with ',' between columns"):
        load_instructions(p)


def test_parquet_error_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([ROWS[0], dict(ROWS[1], instruction="")]), p)
    with pytest.raises(ValueError, match=r"bad\.parquet:row 2: empty 'instruction'"):
        load_instructions(p)


def test_non_text_field(tmp_path):
    msg = _error(tmp_path, [json.dumps(dict(ROWS[0], instruction=["a", "b"]))])
    assert re.match(r".*bad\.jsonl:1: field 'instruction' must be text, got list; store it as a string", msg)


def test_strict_error_counts_the_rest(tmp_path):
    msg = _error(tmp_path, ["{oops", json.dumps(dict(ROWS[0], category="x")), json.dumps(ROWS[1])])
    assert msg.splitlines()[0].endswith("fix the JSON syntax on this line")
    assert "1 more invalid record(s); pass lenient=True" in msg


def test_unsupported_and_missing_files(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello")
    with pytest.raises(ValueError, match=r"a\.txt: unsupported file type '\.txt'"):
        load_instructions(p)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_instructions(tmp_path / "nope.jsonl")


# --- lenient mode --------------------------------------------------------------


def test_lenient_reports_every_skipped_record(tmp_path):
    lines = [
        json.dumps(ROWS[0]),                                   # 1 ok
        "{not json",                                           # 2 malformed
        json.dumps(dict(ROWS[1], category="mathh")),           # 3 unknown category
        json.dumps(dict(ROWS[1], instruction="")),             # 4 empty instruction
        json.dumps({k: v for k, v in ROWS[1].items() if k != "output"}),  # 5 missing output
        json.dumps(ROWS[1]),                                   # 6 ok
        json.dumps(dict(ROWS[2], id="r1")),                    # 7 duplicate id
        "[1, 2]",                                              # 8 not an object
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(DataWarning) as rec:
        records, report = load_instructions(p, lenient=True, return_report=True)
    assert [r.id for r in records] == ["r1", "r2"]
    assert isinstance(report, LoadReport)
    assert sorted(int(s.where) for s in report.skipped) == [2, 3, 4, 5, 7, 8]
    assert report.n_rows == 8 and report.n_loaded == 2
    text = "\n".join(str(w.message) for w in rec)
    assert "skipped 6 invalid record(s)" in text
    for line, reason in [(2, "malformed JSON"), (3, "unknown category 'mathh'"), (4, "empty 'instruction'"),
                         (5, "missing required field 'output'"), (7, "duplicate id 'r1'"),
                         (8, "expected a JSON object")]:
        assert re.search(rf"mixed\.jsonl:{line}: {re.escape(reason)}", text), (line, text)


def test_lenient_json_array(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps([ROWS[0], "oops", dict(ROWS[1], category="??")]), encoding="utf-8")
    with pytest.warns(DataWarning, match=r"arr\.json:item 2: expected a JSON object"):
        records, report = load_instructions(p, lenient=True, return_report=True)
    assert [r.id for r in records] == ["r1"]
    assert [s.where for s in report.skipped] == ["item 2", "item 3"]


# --- balanced sampling --------------------------------------------------------


def _pool(counts: dict[str, int]) -> list[Record]:
    return [Record(f"{c}-{i}", c, f"do {c} {i}", output="ok") for c, n in counts.items() for i in range(n)]


def test_sample_balanced_is_balanced_and_deterministic():
    pool = _pool({c: 10 + k for k, c in enumerate(CATEGORIES)})
    a = sample_balanced(pool, 4, seed=1)
    assert len(a) == 24 and len({r.id for r in a}) == 24
    assert [r.category for r in a] == [c for c in CATEGORIES for _ in range(4)]
    assert a == sample_balanced(pool, 4, seed=1)
    assert a != sample_balanced(pool, 4, seed=2)
    # A category's draw does not depend on the others being sampled.
    only_math = sample_balanced(pool, 4, seed=1, categories=["MATH"])
    assert only_math == [r for r in a if r.category == "math"]


def test_sample_balanced_shortage_names_the_category():
    pool = _pool({"math": 5, "code": 2, "generation": 9})
    with pytest.raises(ValueError, match=r"CODE \(code\) has 2; lower n_per_category"):
        sample_balanced(pool, 3)
    with pytest.raises(ValueError, match=r"SUM \(summarization\) has 0"):
        sample_balanced(pool, 2, categories=["math", "SUM"])


def test_sample_balanced_bounds_default_seed_and_counts():
    pool = _pool({"math": 3, "code": 5})
    # A category with exactly n_per_category records gives all of them; n must be >= 1.
    assert [r.id for r in sample_balanced(pool, 3) if r.category == "math"] == ["math-0", "math-1", "math-2"]
    assert len(sample_balanced(pool, 1)) == 2
    with pytest.raises(ValueError, match="n_per_category must be >= 1"):
        sample_balanced(pool, 0)
    assert sample_balanced(pool, 2) == sample_balanced(pool, 2, seed=0)  # the documented default seed
    # Canonical category order (code before math), categories without records left out.
    assert count_by_category(pool + _pool({"summarization": 1})) == {"code": 5, "math": 3, "summarization": 1}
    assert list(count_by_category(pool)) == ["code", "math"]


def test_load_with_n_per_category(tmp_path):
    rows = [{"id": f"{c}{i}", "category": c, "instruction": f"{c} q {i}", "output": "a"}
            for c in ("math", "code") for i in range(5)]
    p = write_jsonl(tmp_path / "s.jsonl", rows)
    recs = load_instructions(p, n_per_category=3, seed=0)
    assert [r.category for r in recs] == ["code"] * 3 + ["math"] * 3
    assert recs == load_instructions(p, n_per_category=3, seed=0)
    with pytest.raises(ValueError, match="MATH"):
        load_instructions(p, n_per_category=6)


def test_record_built_in_code_is_checked():
    assert Record("x", "SUM", "Summarize.").category == "summarization"
    assert Record("x", "SUM", "Summarize.").short_category == "SUM"
    with pytest.raises(ValueError, match="did you mean 'code'"):
        Record("x", "cod", "Write code.")
    with pytest.raises(ValueError, match="empty instruction"):
        Record("x", "math", "  ")


def test_records_in_memory_load_with_the_checks_of_a_file():
    # A notebook holds its records as dicts or a DataFrame; they pass the same checks as a file.
    import datasets
    import pandas as pd

    rows = [dict(r) for r in ROWS]
    assert load_instructions(rows) == EXPECTED
    assert load_instructions(pd.DataFrame(rows)) == EXPECTED
    assert load_instructions(datasets.Dataset.from_list(rows)) == EXPECTED
    assert load_instructions(r for r in rows) == EXPECTED
    assert load_instructions(EXPECTED) == EXPECTED
    renamed = [{("prompt" if k == "instruction" else k): v for k, v in r.items()} for r in rows]
    assert load_instructions(renamed, fields={"instruction": "prompt"}) == EXPECTED
    assert "instruction" not in renamed[0]  # the caller's dicts are left as they were
    no_ids = load_instructions([{k: v for k, v in r.items() if k != "id"} for r in rows])
    assert [r.id for r in no_ids] == ["records:item 1", "records:item 2", "records:item 3"]
    with pytest.raises(ValueError, match=r"^records:item 2: duplicate id 'r1' \(first seen at records:item 1\)"):
        load_instructions([rows[0], rows[0]])
    with pytest.raises(ValueError, match=r"^records:item 2: unknown category 'poetry'"):
        load_instructions([rows[0], {**rows[1], "category": "poetry"}])
    with pytest.raises(ValueError, match=r"^records:item 2: expected a dict or Record, got str"):
        load_instructions([rows[0], "Add 2 and 3."])
    with pytest.raises(ValueError, match=r"^records: no records \(an empty list\)"):
        load_instructions([])


def test_as_records_passes_records_through_and_reads_anything_else(tmp_path):
    from sparcom_jax.data import as_records

    assert all(a is b for a, b in zip(as_records(EXPECTED), EXPECTED))
    assert as_records([dict(r) for r in ROWS]) == EXPECTED
    assert as_records(write_jsonl(tmp_path / "r.jsonl", ROWS)) == EXPECTED
    with pytest.raises(ValueError, match="duplicate id"):
        as_records([ROWS[0], ROWS[0]])
    # Records built in code are checked too: ids key the counts, the content caps and the splits.
    with pytest.raises(ValueError, match=r"^records:item 3: duplicate id 'r1' \(first seen at records:item 1\)"):
        as_records([EXPECTED[0], EXPECTED[1], EXPECTED[0]])


def test_validate_row_reads_numbers_as_text_and_refuses_a_blank_id():
    # Numeric cells (a CSV column with a gap is read as floats): 3.0 is the id "3", 2.5 stays
    # "2.5"; a blank id is a Problem naming the row, not a record.
    from sparcom_jax.data.records import Problem, Record, validate_row

    row = {"id": 3.0, "category": "math", "instruction": "Add 1 and 1.5.", "output": 2.5}
    got = validate_row(row, "f.csv", "4")
    assert isinstance(got, Record) and (got.id, got.output) == ("3", "2.5")
    blank = validate_row(dict(row, id="  "), "f.csv", "5")
    assert isinstance(blank, Problem) and str(blank).startswith("f.csv:5: empty 'id'")


@pytest.mark.parametrize("enabled", [True, False])
def test_reading_a_file_leaves_the_datasets_progress_bar_setting_as_it_was(tmp_path, enabled):
    # The setting is process-wide: a notebook's own load_dataset calls keep theirs.
    import datasets

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    before = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        load_instructions(tmp_path / "d.jsonl")
        assert datasets.is_progress_bar_enabled() == enabled
    finally:
        (datasets.enable_progress_bars if before else datasets.disable_progress_bars)()


def test_unknown_category_hints_are_spelling_slips_never_another_datasets_label():
    # 'closed_qa' (Dolly) was offered 'classification' and 'information_extraction' 'generation'.
    from sparcom_jax.categories import normalize_category

    for label, meant in (("Maths", "math"), ("mathematics", "math"), ("classify", "classification"),
                         ("Q&A", "general_qa"), ("cls.", "classification"), ("open_qa", "general_qa")):
        with pytest.raises(ValueError, match=f"unknown category '{re.escape(label)}'; did you mean '{meant}'"):
            normalize_category(label)
    for label in ("closed_qa", "information_extraction", "brainstorming"):
        with pytest.raises(ValueError) as e:
            normalize_category(label)
        assert "did you mean" not in str(e.value) and "Valid categories: classification (CLS)" in str(e.value)


def test_category_map_keys_given_as_numbers_map_number_labels(tmp_path):
    p = tmp_path / "num.jsonl"
    p.write_text("".join(json.dumps({"id": f"r{i}", "category": c, "instruction": f"Do {i}.", "output": "ok"}) + "\n"
                         for i, c in enumerate([0, "1", 2.0, 1])))
    recs = load_instructions(p, category_map={0: "code", 1.0: "math", "2": "sum"})
    assert [r.category for r in recs] == ["code", "math", "summarization", "math"]
    with pytest.raises(ValueError, match=r"category_map: the key True \(bool\) can never be a file's label"):
        load_instructions(p, category_map={True: "code"})
    with pytest.raises(ValueError, match=r"the keys 1 and '1' are both the label '1', mapped to 'code' and 'math'"):
        load_instructions(p, category_map={1: "code", "1": "math"})
    assert [r.category for r in load_instructions(p, category_map={1: "math", "1": "math", 0: "code", 2: "sum"})] == [
        "code", "math", "summarization", "math"]  # two spellings of one mapping are one


# --- copies: one record under two ids, one text under two categories ----------------------


def _warned(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def test_a_record_repeated_under_another_id_is_named_with_its_file_and_line(tmp_path):
    # The copy differs in case and spacing only; it counted as a second instruction of MATH.
    copy = dict(ROWS[0], id="r1-again", instruction="  add 2 AND 3. ", output="5 ")
    p = write_jsonl(tmp_path / "a.jsonl", [*ROWS, copy])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs, report = load_instructions(p, return_report=True)
    said = _warned(caught)
    assert len(said) == 1 and len(recs) == 4  # said once, nothing dropped
    assert said[0].startswith(
        f"1 record(s) repeat another record of their category under another id (instruction, input and response "
        f"alike, case and spacing ignored; MATH 1; e.g. 'r1' ({p}:1) and 'r1-again' ({p}:4)): ")
    assert "weighs once per copy" in said[0] and said[0].endswith("keep one record of each (remove the other ids)")
    assert report.repeated == [("r1", "r1-again")] and report.cross_category == []
    assert report.summary().endswith("; 1 repeat another record, 0 instruction text(s) under two or more categories")


@pytest.mark.parametrize("other", [{"output": "6"}, {"input": "x = 1"}])
def test_one_instruction_with_another_input_or_response_in_its_category_is_no_copy(tmp_path, other):
    p = write_jsonl(tmp_path / "a.jsonl", [*ROWS, dict(ROWS[0], id="r4", **other)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recs, report = load_instructions(p, return_report=True)
    assert len(recs) == 4 and report.repeated == report.cross_category == []


@pytest.mark.parametrize("other_input, prompts", [("", 1), ("x = 1", 0)])
def test_one_instruction_under_two_categories_is_named_with_categories_files_and_lines(tmp_path, other_input,
                                                                                        prompts):
    # A CSV (lines counted from the header, line 1) and the same record labelled CODE: only the
    # cross-category case is said (a copy of one category would be the other warning); with
    # another input the instruction is still shared, but the prompt is not the same.
    p = write_csv(tmp_path / "a.csv", [*ROWS, dict(ROWS[0], id="x", category="code", input=other_input)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs, report = load_instructions(p, return_report=True)
    said = _warned(caught)
    assert len(said) == 1 and len(recs) == 4
    assert said[0].startswith(
        f"1 instruction text(s) appear under two or more categories (2 records; texts per category: CODE 1, "
        f"MATH 1; {prompts} of the texts with one input under two categories too, the same prompt; case and "
        f"spacing ignored; e.g. 'r1' (math, {p}:2) and 'x' (code, {p}:5)): ")
    assert "overlap is inflated" in said[0] and "keeps all records of such a text in one part" in said[0]
    assert said[0].endswith("give each text the one category it belongs to (relabel or remove the other copies)")
    assert report.cross_category == [("r1", "x")] and report.repeated == []


def test_copies_among_records_in_memory_name_their_items():
    rows = [dict(r) for r in ROWS] + [dict(ROWS[2], id="q2", category="SUM")]
    with pytest.warns(DataWarning, match=re.escape("e.g. 'r3' (general_qa, records:item 3) and 'q2' "
                                                   "(summarization, records:item 4))")):
        load_instructions(rows)
    # One text under four categories: three ids named, the rest counted.
    rows += [dict(ROWS[2], id="q3", category="CLS"), dict(ROWS[2], id="q4", category="GEN")]
    with pytest.warns(DataWarning, match=re.escape(
            "(4 records; texts per category: CLS 1, QA 1, GEN 1, SUM 1; 1 of the texts with one input under two "
            "categories too, the same prompt; case and spacing ignored; e.g. 'r3' (general_qa, records:item 3), "
            "'q2' (summarization, records:item 4) and 'q3' (classification, records:item 5) (+1 more)): ")):
        load_instructions(rows)


def test_a_clean_file_and_the_shipped_set_load_without_a_word():
    # Records sharing an input or a response across categories are no copies: only their
    # instruction decides.
    rows = [dict(ROWS[0]), dict(ROWS[1], output="5"), dict(ROWS[2], input="s = 'abc'")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_instructions(rows)) == 3
        _, report = load_instructions(return_report=True)
    assert report.repeated == report.cross_category == []
