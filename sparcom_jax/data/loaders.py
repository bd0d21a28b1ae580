"""Load instruction records from the shipped set or from local files.

Files are read with the `datasets` library (JSON, JSON Lines, CSV/TSV, Parquet,
or a directory written by `Dataset.save_to_disk`). Before that, JSON text is
checked with `json.loads` so a syntax error can be reported with its line
number; `datasets` itself does the reading. Every row then goes through the
shared validation in `records.py`, optionally after an adapter from
`adapters.py`.

Positions in messages: JSON Lines and CSV report the line number
(`file.jsonl:12: ...`), a JSON array the item (`file.json:item 3: ...`),
Parquet and `datasets` directories the row (`file.parquet:row 3: ...`,
`dir:train row 3: ...`), all counted from 1; ids derived from them: see
`load_instructions`. Records given in memory (dicts, `Record`s, a pandas DataFrame,
as a notebook has them) go through the same validation, as the file `records` with
the item counted from 1 (`records:item 3: ...`).

Text files (JSON, JSON Lines, CSV, TSV) must be UTF-8: they are decoded here
first, so a stray Latin-1 byte is reported with its line instead of as a
decoding error deep inside `datasets`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from sparcom_jax.categories import normalize_category
from sparcom_jax.data.adapters import Adapter, detect_adapter, get_adapter
from sparcom_jax.data.records import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    DataWarning,
    Excluded,
    LoadReport,
    Problem,
    Record,
    check_duplicates,
    label_map,
    validate_row,
)
from sparcom_jax.data.sampling import sample_balanced
from sparcom_jax.fileio import read_utf8, relative_note

#: The balanced six-category set shipped with the package (see docs/data.md).
SHIPPED_PATH = Path(__file__).resolve().parent / "shipped" / "hexa_mini.jsonl"

_JSON_SUFFIXES = {".json"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}


@dataclasses.dataclass
class _Table:
    """Rows read from one file, with their positions and any unreadable rows."""

    file: str
    rows: list[dict[str, Any]]
    where: list[str]
    columns: list[str]
    problems: list[Problem]
    in_memory: bool = False


def _datasets_load(builder: str, file: Path, **kwargs) -> tuple[list[dict], list[str]]:
    import datasets  # heavy import, only when files are read

    # No bars for our small reads, and the caller's own setting back afterwards (it is
    # process-wide: a notebook's later load_dataset calls would lose theirs).
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    # A private cache per call: no stale results when a file is edited in place,
    # and nothing left behind in the user's home cache.
    try:
        with tempfile.TemporaryDirectory(prefix="sparcom_data_") as cache:
            try:
                ds = datasets.load_dataset(
                    builder, data_files=str(file), split="train", cache_dir=cache,
                    keep_in_memory=True, **kwargs,
                )
            except Exception as err:  # datasets raises many types; add the file name
                raise ValueError(
                    f"{file}: could not be read as {builder}: {err}; check the file format"
                ) from err
            return ds.to_list(), list(ds.column_names)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _read_text(file: Path) -> str:
    """The file's text; a byte that is not UTF-8, or no text at all, is an error naming the file."""
    text = read_utf8(file)
    if not text.strip():
        raise _empty_file(file, "the file is empty" if not text else "the file has only blank lines")
    return text


def _empty_file(file: Path, what: str) -> ValueError:
    return ValueError(
        f"{file}: no records ({what}); add records to it, or load the right file"
    )


def _json_error(file: Path, line: int, err: json.JSONDecodeError) -> Problem:
    return Problem(
        str(file), str(line), f"malformed JSON ({err.msg} at column {err.colno})",
        "fix the JSON syntax on this line",
    )


def _read_json_lines(file: Path, text: str) -> _Table:
    problems: list[Problem] = []
    good_lines: list[str] = []
    where: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(_json_error(file, lineno, err))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(
                str(file), str(lineno), f"expected a JSON object, got {type(obj).__name__}",
                'write one object per line, like {"id": ..., "instruction": ...}',
            ))
            continue
        good_lines.append(line)
        where.append(str(lineno))
    # The readable lines are loaded even in strict mode, so the error can count
    # every problem in the file.
    rows, columns = _load_json_subset(file, good_lines, all_good=not problems)
    return _Table(str(file), rows, where, columns, problems)


def _load_json_subset(file: Path, lines: list[str], all_good: bool):
    if not lines:
        return [], []
    if all_good:
        return _datasets_load("json", file)
    # Lenient mode with unreadable lines: hand datasets only the readable ones.
    with tempfile.TemporaryDirectory(prefix="sparcom_data_") as tmp:
        part = Path(tmp) / (file.stem + ".jsonl")
        part.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return _datasets_load("json", part)


def _read_json(file: Path) -> _Table:
    text = _read_text(file)
    jsonl = file.suffix.lower() in _JSONL_SUFFIXES
    # A .jsonl file holding one JSON list (json.dump(records, f) under a .jsonl name) is read as
    # the list it is: read line by line, each of its lines was "malformed JSON".
    if jsonl and not text.lstrip().startswith("["):
        return _read_json_lines(file, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # A .json file may hold JSON Lines; accept it when every line is an object.
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if jsonl or (len(lines) > 1 and all(ln.lstrip().startswith("{") for ln in lines)):
            return _read_json_lines(file, text)
        raise ValueError(str(_json_error(file, err.lineno, err))) from err
    if not isinstance(data, list):
        raise ValueError(
            f"{file}:1: expected a JSON list of records, got {type(data).__name__}; "
            "write [{...}, {...}] or one object per line (JSON Lines)"
        )
    if not data:
        raise _empty_file(file, "an empty JSON list")
    problems, keep, where = [], [], []
    for i, obj in enumerate(data, start=1):
        if isinstance(obj, dict):
            keep.append(json.dumps(obj, ensure_ascii=False))
            where.append(f"item {i}")
        else:
            problems.append(Problem(
                str(file), f"item {i}", f"expected a JSON object, got {type(obj).__name__}",
                "make every list item an object with the record fields",
            ))
    rows, columns = _load_json_subset(file, keep, all_good=not problems)
    return _Table(str(file), rows, where, columns, problems)


def _csv_rows(text: str, sep: str) -> Iterator[tuple[int, list[str]]]:
    """(the line it starts on, 1-based; its cells) of every CSV row, the header's first,
    skipping blank lines as pandas does."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    prev = 0
    for row in reader:
        if row:
            yield prev + 1, row
        prev = reader.line_num


def _csv_lines(text: str, sep: str) -> tuple[list[int], list[str], dict[int, list[str]]]:
    """The line each CSV data row starts on, the header's column names, and the rows of another
    number of cells than the header, by line."""
    starts, header, ragged = [], [], {}
    for line, row in _csv_rows(text, sep):
        starts.append(line)
        header = header or row
        if len(row) != len(header):
            ragged[line] = row
    return starts[1:], header, ragged  # the first row is the header


def _ragged_problem(file: Path, line: int, row: list[str], header: list[str], sep: str) -> Problem:
    """A CSV row of more or fewer cells than the header: pandas refused the first kind with no
    line ("could not be read as csv: An error occurred while generating the dataset") and read
    the second with its last fields empty, a record's output lost without a word."""
    return Problem(str(file), str(line), f"{len(row)} cells where the header has {len(header)}",
                   f"quote a cell that holds {sep!r} (\"like{sep} this\"), or give the row every column")


def _read_csv(file: Path, sep: str) -> _Table:
    text = _read_text(file)
    try:
        lines, header, ragged = _csv_lines(text, sep)
    except csv.Error:
        lines, header, ragged = None, [], {}
    if lines == []:  # datasets cannot read a header without rows; say what is wrong instead
        raise _empty_file(file, f"only the header line, columns {header}")
    # Empty cells stay "" (an empty optional input, or an empty instruction that
    # validation names as such) instead of becoming NaN, and every cell is read as the
    # text it is: pandas would otherwise turn a column of numbers into ints or floats
    # ("007" -> 7, "0.10" -> 0.1, a 20-digit number rounded), changing ids and answers.
    import datasets

    other = next((o for o in (";", "\t", "|", ",") if len(header) == 1 and o != sep and o in header[0]), None)
    if other:  # (a semicolon CSV, as spreadsheets write it in many locales): every row one cell
        raise ValueError(f"{file}:1: the header is one column, {header[0][:80]!r}: its columns are separated by "
                         f"{other!r}, where a {file.suffix} file's are by {sep!r}; save it with {sep!r} between "
                         f"columns (pandas: df.to_csv(path, index=False){', or name it .tsv' if other == chr(9) else ''})")
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:  # pandas would rename the second copy ("input.1") and the record read the first
        raise ValueError(f"{file}:1: column(s) {dup} appear more than once in the header; "
                         "give every column its own name")
    features = datasets.Features({c: datasets.Value("string") for c in header}) if header else None
    problems = [_ragged_problem(file, n, row, header, sep) for n, row in ragged.items()]
    lines = [n for n in lines or [] if n not in ragged]
    if not problems:
        rows, columns = _datasets_load("csv", file, sep=sep, na_filter=False, features=features)
    elif not lines:
        rows, columns = [], header
    else:  # hand datasets only the rows that fit the header (lenient mode reads them)
        with tempfile.TemporaryDirectory(prefix="sparcom_data_") as tmp:
            part = Path(tmp) / file.name
            with open(part, "w", newline="", encoding="utf-8") as f:
                csv.writer(f, delimiter=sep).writerows(row for n, row in _csv_rows(text, sep) if n not in ragged)
            rows, columns = _datasets_load("csv", part, sep=sep, na_filter=False, features=features)
    if len(lines) == len(rows):
        where = [str(n) for n in lines]
    else:  # unusual quoting: fall back to row numbers rather than guess lines
        where = [f"row {i}" for i in range(1, len(rows) + 1)]
    return _Table(str(file), rows, where, columns, problems)


def _read_parquet(file: Path) -> _Table:
    import pyarrow.parquet as pq  # datasets' own dependency

    try:
        n_rows = pq.ParquetFile(file).metadata.num_rows
    except Exception:  # pyarrow raises several types; datasets names the file below
        n_rows = None
    if n_rows == 0:
        raise _empty_file(file, "a Parquet file with 0 rows")
    rows, columns = _datasets_load("parquet", file)
    return _Table(str(file), rows, [f"row {i}" for i in range(1, len(rows) + 1)], columns, [])


def _read_saved(directory: Path) -> _Table:
    import datasets

    try:
        obj = datasets.load_from_disk(str(directory), keep_in_memory=True)
    except Exception as err:
        raise ValueError(
            f"{directory}: not a directory written by datasets' save_to_disk ({err}); "
            "pass a data file, or save the dataset with Dataset.save_to_disk"
        ) from err
    parts = obj.items() if isinstance(obj, datasets.DatasetDict) else [(None, obj)]
    columns = list(dict.fromkeys(c for _, ds in parts for c in ds.column_names))
    rows, where = [], []
    for split, ds in parts:
        part = ds.to_list()
        rows.extend(part)
        label = f"{split} row" if split is not None else "row"
        where.extend(f"{label} {i}" for i in range(1, len(part) + 1))
    if not rows:
        raise _empty_file(directory, "a datasets directory with 0 rows")
    return _Table(str(directory), rows, where, columns, [])


def read_table(path: str | os.PathLike) -> _Table:
    """Read one file or `datasets` directory into raw rows with their positions."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{file}: no such file or directory{relative_note(file)}")
    if file.is_dir():
        return _read_saved(file)
    suffix = file.suffix.lower()
    if suffix in _JSON_SUFFIXES | _JSONL_SUFFIXES:
        return _read_json(file)
    if suffix in _CSV_SUFFIXES:
        return _read_csv(file, _CSV_SUFFIXES[suffix])
    if suffix in _PARQUET_SUFFIXES:
        return _read_parquet(file)
    packed = ("; decompress it first (e.g. `gunzip -k`, `unzip`)"
              if suffix in (".gz", ".zip", ".bz2", ".xz", ".zst") else "")
    raise ValueError(
        f"{file}: unsupported file type {suffix!r}{packed}; use .json, .jsonl, .csv, .tsv, "
        ".parquet or a datasets save_to_disk directory"
    )


IN_MEMORY = "records"  # the "file" named in messages about records given in memory


def _is_frame(obj: Any) -> bool:
    """Whether `obj` is a pandas DataFrame (told without importing pandas)."""
    return hasattr(obj, "to_dict") and hasattr(obj, "columns")


def _rows_table(rows: Any) -> _Table:
    """Records given in memory as one table: a pandas DataFrame, or a sequence of dicts and
    `Record`s (positions "item 1", "item 2", ...)."""
    if _is_frame(rows):
        rows = rows.to_dict("records")
    items, where, problems = [], [], []
    for i, obj in enumerate(rows, start=1):
        if isinstance(obj, Record):
            obj = dataclasses.asdict(obj)
        if isinstance(obj, Mapping):
            items.append(dict(obj))
            where.append(f"item {i}")
        else:
            problems.append(Problem(
                IN_MEMORY, f"item {i}", f"expected a dict or Record, got {type(obj).__name__}",
                "make every item a dict with the record fields, e.g. {'id': ..., 'category': ..., "
                "'instruction': ...}"))
    if not items and not problems:
        raise ValueError(f"{IN_MEMORY}: no records (an empty list); pass at least one record")
    columns = list(dict.fromkeys(k for row in items for k in row))
    return _Table(IN_MEMORY, items, where, columns, problems, in_memory=True)


def _is_rows(source: Any) -> bool:
    """Whether `load_instructions` was given records in memory rather than file names."""
    if source is None or isinstance(source, (str, os.PathLike)):
        return False
    if _is_frame(source):
        return True
    return isinstance(source, Sequence) and (not source or any(isinstance(r, (Mapping, Record)) for r in source))


def as_records(records: Any, where: str = "this call") -> list[Record]:
    """`records` as a list of `Record`s: a list of Records as it is (after checking that their
    ids are unique, as a file's must be), anything else (a file, a list of files, dicts, a
    DataFrame) read with `load_instructions`.

    Raises:
      ValueError: load_instructions' error, with the way to its options (`fields=`,
        `category_map=`, ...), which `where` (the caller, e.g. collect_instructions) does not take.
    """
    if isinstance(records, Sequence) and not isinstance(records, str) \
            and all(isinstance(r, Record) for r in records):  # an empty list too: the caller says what is missing
        first: dict[str, int] = {}
        for i, r in enumerate(records, start=1):
            if r.id in first:
                raise ValueError(f"{IN_MEMORY}:item {i}: duplicate id {r.id!r} (first seen at "
                                 f"{IN_MEMORY}:item {first[r.id]}); give each record a unique id")
            first[r.id] = i
        return list(records)
    try:
        return load_instructions(records)
    except ValueError as e:
        raise ValueError(f"{e}. ({where} reads records with load_instructions' defaults; for fields=, "
                         "category_map= or its other options call sj.load_instructions(...) first and pass "
                         "the Records it returns)") from e


def _apply_fields(table: _Table, fields: Mapping[str, str]) -> None:
    """Copy each mapped column into the name the record (or adapter) expects."""
    for ours, theirs in fields.items():
        if theirs not in table.columns:
            raise ValueError(
                f"{table.file}: fields maps {ours!r} to column {theirs!r}, which the file "
                f"does not have (columns: {table.columns}); fix the mapping"
            )
    for row in table.rows:
        for ours, theirs in fields.items():
            row[ours] = row.get(theirs)
    table.columns = list(dict.fromkeys(list(table.columns) + list(fields)))


def _check_columns(table: _Table, required: Sequence[str], what: str) -> None:
    if not table.rows:  # an empty file has no columns to check
        return
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(
            f"{table.file}: missing required column(s) {missing} for {what} "
            f"(columns found: {table.columns}); add them, or map the columns that hold "
            f"them with fields={{{missing[0]!r}: '<column>'}} (data.fields in a config)"
        )


# Column names that usually hold a record field under another name (Dolly's context and
# response, prompt/completion pairs, ...): the warning about unread columns suggests the mapping.
_LIKELY_FIELD = {"context": "input", "inputs": "input", "response": "output", "answer": "output",
                 "completion": "output", "target": "output", "prompt": "instruction", "question": "instruction",
                 "label": "category", "type": "category", "task": "category"}


def _warn_unread(table: _Table, fields: Mapping[str, str]) -> None:
    """Warn about the columns of a record-format file that no record field reads: a column
    holding the input under another name (e.g. Dolly's `context`) would otherwise be
    dropped from every record without a word."""
    used = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS) | set(fields.values())
    unread = [c for c in table.columns if c not in used]
    if not table.rows or not unread:
        return
    names = REQUIRED_FIELDS + OPTIONAL_FIELDS
    hints = {}
    for c in unread:  # a usual alias, or a misspelt field name
        close = difflib.get_close_matches(c.lower(), names, n=1, cutoff=0.8)
        if c.lower() in _LIKELY_FIELD or close:
            hints[c] = _LIKELY_FIELD.get(c.lower()) or close[0]
    fix = (f"; if {'it holds' if len(hints) == 1 else 'they hold'} a record field, map "
           f"{'it' if len(hints) == 1 else 'them'}: fields={ {f: c for c, f in hints.items()} } (data.fields "
           "in a config)" if hints else "")
    warnings.warn(
        f"{table.file}: column(s) {unread} are not read: records take only the fields "
        f"{', '.join(names)}{fix}", DataWarning, stacklevel=3)


def check_fields(fields: Mapping[str, str] | None, adapter: str | None = None) -> None:
    """Refuse a `fields=` key that is not a record field (without an adapter): the column
    it maps would go to a field no record reads, dropped without a word.

    Raises:
      ValueError: naming the key, the closest field and the valid ones.
    """
    if not fields or adapter is not None:  # an adapter's expected columns are its own
        return
    names = REQUIRED_FIELDS + OPTIONAL_FIELDS
    for key in fields:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            raise ValueError(f"{key!r} is not a record field{f' (did you mean {close[0]!r}?)' if close else ''}; "
                             f"the keys are record fields ({', '.join(names)}), the values your file's columns, "
                             "e.g. {input: context}")


def _id_stem(table: _Table) -> str:
    """The prefix of derived ids: the file name without its suffix (a directory's name)."""
    if table.in_memory:
        return IN_MEMORY
    p = Path(table.file)
    return p.name if p.is_dir() else p.stem


def _no_records(report: LoadReport, problems: Sequence[Problem]) -> ValueError:
    counts = [f"{report.n_rows} row(s) read"]
    fixes = []
    if problems:
        counts.append(f"{len(problems)} invalid")
        fixes.append(f"fix the invalid records (first: {problems[0]})")
    if report.excluded:
        counts.append(f"{len(report.excluded)} excluded")
        fixes.append(f"check categories= and the adapter (first excluded: {report.excluded[0]})")
    return ValueError(f"{', '.join(report.files)}: no usable records ({', '.join(counts)}); "
                      + ("; ".join(fixes) or "add records"))


def _as_paths(path) -> list[Path]:
    if path is None:
        return [SHIPPED_PATH]
    if isinstance(path, (str, os.PathLike)):
        return [Path(path)]
    return [Path(p) for p in path]


def load_instructions(
    path: str | os.PathLike | Iterable[str | os.PathLike | Mapping | Record] | None = None,
    *,
    fields: Mapping[str, str] | None = None,
    adapter: str | None = None,
    lenient: bool = False,
    n_per_category: int | None = None,
    seed: int = 0,
    categories: Iterable[str] | None = None,
    category_map: Mapping[str, str] | None = None,
    return_report: bool = False,
) -> list[Record] | tuple[list[Record], LoadReport]:
    """Load instruction records.

    Ids: a file with an `id` column (after `fields=`) must give every record a
    non-empty id, unique over everything loaded together. A file without an
    `id` column gets stable ids from the file stem and the record's position,
    the same on every run and whatever is sampled: "<stem>:<line>" for JSON
    Lines and CSV/TSV, "<stem>:item <n>" for a JSON list, "<stem>:row <n>" for
    Parquet and "<dir>:<split> row <n>" (or "<dir>:row <n>") for `datasets`
    directories. Adapters make their own ids (see `adapters.py`).

    Args:
      path: a file (.json, .jsonl, .csv, .tsv, .parquet), a `datasets`
        save_to_disk directory, or a list of them; None loads the shipped set. Or the
        records themselves: a list of dicts (or `Record`s), a pandas DataFrame or a
        `datasets.Dataset`, with the same columns and checks as a file (named `records` in messages, items
        counted from 1; without an `id` column the ids are "records:item <n>").
      fields: expected column -> column in the file, e.g.
        {"instruction": "prompt", "output": "completion"}. Expected columns are
        the record fields, or the adapter's columns when `adapter` is set.
      adapter: None for files already in the record format; one of "dolly",
        "alpaca", "gsm8k", "mbpp", "humaneval", "codealpaca"; or "auto" to guess
        from the column names.
      lenient: skip invalid records instead of raising; one `DataWarning` lists
        every skipped record (file, line/row, reason) and the report keeps them.
      n_per_category: if set, return a balanced sample of this many per category
        (see `sample_balanced`).
      seed: seed of the balanced sample.
      categories: keep only these categories (any accepted name); the others are
        recorded in the report as excluded.
      category_map: raw category label -> category name, applied before the
        labels are checked (e.g. {"brainstorm": "generation"}).
      return_report: also return the `LoadReport`.

    Copies among the returned records are named in a `DataWarning` (`check_duplicates`, kept in
    the report): records of one category alike in instruction, input and response under
    different ids, and one instruction text under two or more categories.

    Returns:
      The records in file order (or sampled), and the report if asked for.

    Raises:
      ValueError: on malformed JSON, an unknown category, an empty instruction, a
        missing required field, a duplicate id, ...; the message starts with
        "<file>:<line or row>: <what is wrong>; <how to fix>". In lenient mode only
        file-level problems raise: an unreadable or non-UTF-8 file, a missing
        column, a file with no records (empty, blank lines only, a header only),
        and a load left with no usable record at all.
    """
    report = LoadReport()
    try:
        check_fields(fields, adapter)
    except ValueError as e:
        raise ValueError(f"fields: {e}") from None
    category_map = label_map(category_map)
    keep_cats = None if categories is None else {normalize_category(c) for c in categories}
    problems: list[Problem] = []
    adapter_excluded: list[Excluded] = []
    records: list[Record] = []
    seen: dict[str, tuple[str, bool]] = {}  # id -> (where first seen, derived)
    if isinstance(path, (Mapping, Record)):  # (a dict's keys were read as file names: "category: no such file")
        raise ValueError(f"{IN_MEMORY}: one record ({type(path).__name__}) where a list of records or a file is "
                         "expected; pass a list of them, [record]")
    if isinstance(path, Iterable) and not isinstance(path, (str, os.PathLike)) and not hasattr(path, "columns"):
        path = list(path)  # a generator (or a `datasets.Dataset`) is read once
    tables = [_rows_table(path)] if _is_rows(path) else map(read_table, _as_paths(path))
    for table in tables:
        report.files.append(table.file)
        report.n_rows += len(table.rows) + len(table.problems)
        problems.extend(table.problems)
        if fields:
            _apply_fields(table, fields)
        name = detect_adapter(table.columns) if adapter == "auto" else adapter
        ad: Adapter | None = get_adapter(name) if name else None
        derive_ids = ad is None and "id" not in table.columns
        if ad is None:
            _check_columns(table, [f for f in REQUIRED_FIELDS if f != "id" or not derive_ids],
                           "the record format")
            _warn_unread(table, fields or {})
        else:
            _check_columns(table, ad.required, f"the {ad.name} adapter")
        columns = dict(ad.columns) if ad else {}
        if fields:  # name the user's own columns in messages
            columns.update({k: fields.get(v, v) for k, v in columns.items()})
            columns.update({k: v for k, v in fields.items() if k not in columns})
        stem = _id_stem(table)
        for n, (row, where) in enumerate(zip(table.rows, table.where), start=1):
            if derive_ids:
                row = {**row, "id": f"{stem}:{where}"}
            if ad is not None:
                row = ad.convert(row, n, stem)
                if isinstance(row, str):
                    ex = Excluded(table.file, where, row)
                    adapter_excluded.append(ex)
                    report.excluded.append(ex)
                    continue
            rec = validate_row(row, table.file, where, category_map, columns)
            if isinstance(rec, Problem):
                problems.append(rec)
                continue
            if rec.id in seen:
                first, first_derived = seen[rec.id]
                fix = ("ids made from the file name collide: rename one of the files, or give "
                       "the records an 'id' column" if derive_ids or first_derived
                       else "give each record a unique id")
                problems.append(Problem(
                    table.file, where, f"duplicate id {rec.id!r} (first seen at {first})", fix,
                ))
                continue
            seen[rec.id] = (f"{table.file}:{where}", derive_ids)
            if keep_cats is not None and rec.category not in keep_cats:
                report.excluded.append(
                    Excluded(table.file, where, f"category {rec.category!r} not in categories=")
                )
                continue
            records.append(rec)

    if problems and not lenient:
        more = ""
        if len(problems) > 1:
            more = (f"\n({len(problems) - 1} more invalid record(s); pass lenient=True (data.lenient in "
                    "a config) to skip them all with a report)")
        raise ValueError(str(problems[0]) + more)
    if problems:
        report.skipped = problems
        warnings.warn(
            f"skipped {len(problems)} invalid record(s):\n" + "\n".join(map(str, problems)),
            DataWarning, stacklevel=2,
        )
    if adapter_excluded:
        reasons = collections.Counter(ex.reason for ex in adapter_excluded)
        detail = "; ".join(f"{r}: {k}" for r, k in reasons.items())
        warnings.warn(
            f"excluded {len(adapter_excluded)} record(s) outside the six categories ({detail}); "
            "the report lists each one", DataWarning, stacklevel=2,
        )
    if not records:
        raise _no_records(report, problems)
    if n_per_category is not None:
        records = sample_balanced(records, n_per_category, seed=seed, categories=keep_cats)
    report.n_loaded = len(records)
    report.repeated, report.cross_category = check_duplicates(records, {i: at for i, (at, _) in seen.items()})
    return (records, report) if return_report else records


__all__ = ["DataWarning", "SHIPPED_PATH", "as_records", "check_fields", "load_instructions", "read_table"]
