"""Adapters from public instruction sets, on tiny files written here."""

from __future__ import annotations

import json

import pytest

from sparcom_jax.data import DataWarning, Record, detect_adapter, load_instructions
from sparcom_jax.data.adapters import HUMANEVAL_INSTRUCTION


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


DOLLY = [
    {"instruction": "Is a whale a fish?", "context": "", "response": "No, a mammal.", "category": "classification"},
    {"instruction": "Summarize the text.", "context": "Long text here.", "response": "Short.", "category": "summarization"},
    {"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare.", "category": "open_qa"},
    {"instruction": "When was it built?", "context": "Built in 1889.", "response": "1889.", "category": "closed_qa"},
    {"instruction": "Why is the sky blue?", "context": "", "response": "Scattering.", "category": "general_qa"},
    {"instruction": "Write a haiku.", "context": "", "response": "Leaves fall...", "category": "creative_writing"},
    {"instruction": "List pet names.", "context": "", "response": "Rex, Tom.", "category": "brainstorming"},
    {"instruction": "Extract the dates.", "context": "In 1990 and 2000.", "response": "1990, 2000", "category": "information_extraction"},
]


def test_dolly_maps_categories_and_reports_exclusions(tmp_path):
    p = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    with pytest.warns(DataWarning, match=r"excluded 1 record\(s\).*information_extraction"):
        recs, report = load_instructions(p, adapter="dolly", return_report=True)
    assert [r.category for r in recs] == [
        "classification", "summarization", "general_qa", "general_qa", "general_qa",
        "generation", "generation",
    ]
    assert recs[1] == Record("dolly-dolly-2", "summarization", "Summarize the text.",
                             "Long text here.", "Short.", "dolly")
    assert [str(e) for e in report.excluded] == [
        f"{p}:8: Dolly category 'information_extraction' has no SPARCOM counterpart"
    ]
    assert report.skipped == []


def test_dolly_bad_row_names_the_source_column(tmp_path):
    rows = [DOLLY[0], dict(DOLLY[1], response=None), dict(DOLLY[2], category="open_q")]
    p = write_jsonl(tmp_path / "dolly.jsonl", rows)
    with pytest.raises(ValueError, match=r"dolly\.jsonl:2: missing required field 'output' \(column 'response'\)"):
        load_instructions(p, adapter="dolly")
    with pytest.warns(DataWarning, match=r"dolly\.jsonl:3: unknown category 'open_q'"):
        recs = load_instructions(p, adapter="dolly", lenient=True)
    assert len(recs) == 1


def test_alpaca_with_category_column_and_field_mapping(tmp_path):
    rows = [
        {"instruction": "Classify: great movie!", "input": "", "output": "positive", "type": "CLS"},
        {"instruction": "Solve 2x=4.", "input": "", "output": "x=2", "type": "maths"},
    ]
    p = write_jsonl(tmp_path / "alp.jsonl", rows)
    recs = load_instructions(p, adapter="alpaca", fields={"category": "type"}, category_map={"maths": "math"})
    assert [(r.id, r.category, r.source) for r in recs] == [
        ("alpaca-alp-1", "classification", "alpaca"), ("alpaca-alp-2", "math", "alpaca")]
    with pytest.raises(ValueError, match=r"alp\.jsonl:2: unknown category 'maths'.*did you mean 'math'"):
        load_instructions(p, adapter="alpaca", fields={"category": "type"})


def test_gsm8k(tmp_path):
    rows = [{"question": "Tom has 3 apples and buys 2. How many?", "answer": "3+2=5\n#### 5"},
            {"question": "What is 6*7?", "answer": "#### 42"}]
    p = write_jsonl(tmp_path / "train.jsonl", rows)
    recs = load_instructions(p, adapter="gsm8k")
    assert recs[0] == Record("gsm8k-train-1", "math", rows[0]["question"], "", rows[0]["answer"], "gsm8k")
    assert {r.category for r in recs} == {"math"}
    # Two splits of the same set get distinct ids.
    q = write_jsonl(tmp_path / "test.jsonl", rows[:1])
    assert len(load_instructions([p, q], adapter="gsm8k")) == 3


def test_gsm8k_missing_column(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [{"problem": "1+1?", "answer": "2"}])
    with pytest.raises(ValueError, match=r"g\.jsonl: missing required column\(s\) \['question'\] for the gsm8k adapter"):
        load_instructions(p, adapter="gsm8k")
    assert load_instructions(p, adapter="gsm8k", fields={"question": "problem"})[0].instruction == "1+1?"


def test_mbpp_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"task_id": 11, "text": "Write a function to add two numbers.",
             "code": "def add(a, b):\n    return a + b",
             "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}]
    p = tmp_path / "mbpp.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    (rec,) = load_instructions(p, adapter="mbpp")
    assert rec.id == "mbpp-11" and rec.category == "code" and rec.output == rows[0]["code"]
    assert rec.input == "Your code should pass these tests:\nassert add(1, 2) == 3\nassert add(0, 0) == 0"


def test_humaneval(tmp_path):
    rows = [{"task_id": "HumanEval/0", "prompt": "def inc(x):\n    \"\"\"Add one.\"\"\"\n",
             "canonical_solution": "    return x + 1\n", "test": "assert inc(1) == 2", "entry_point": "inc"}]
    p = write_jsonl(tmp_path / "he.jsonl", rows)
    (rec,) = load_instructions(p, adapter="humaneval")
    assert rec == Record("HumanEval/0", "code", HUMANEVAL_INSTRUCTION, rows[0]["prompt"],
                         rows[0]["canonical_solution"], "humaneval")


def test_codealpaca_csv(tmp_path):
    p = tmp_path / "ca.csv"
    p.write_text('instruction,input,output\n"Print hello in C.",,"printf(""hello"");"\n', encoding="utf-8")
    (rec,) = load_instructions(p, adapter="codealpaca")
    assert rec == Record("codealpaca-ca-1", "code", "Print hello in C.", "", 'printf("hello");', "codealpaca")


def test_autodetect(tmp_path):
    assert detect_adapter(["id", "category", "instruction", "output", "input"]) is None
    assert detect_adapter(list(DOLLY[0])) == "dolly"
    assert detect_adapter(["question", "answer"]) == "gsm8k"
    assert detect_adapter(["task_id", "text", "code", "test_list"]) == "mbpp"
    assert detect_adapter(["task_id", "prompt", "canonical_solution", "test"]) == "humaneval"
    assert detect_adapter(["instruction", "input", "output", "category"]) == "alpaca"
    with pytest.raises(ValueError, match="pass adapter="):
        detect_adapter(["instruction", "input", "output"])  # ambiguous: must be named
    p = write_jsonl(tmp_path / "d.jsonl", DOLLY[:3])
    assert len(load_instructions(p, adapter="auto")) == 3


def test_unknown_adapter(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", DOLLY[:1])
    with pytest.raises(ValueError, match="unknown adapter 'doly'"):
        load_instructions(p, adapter="doly")
