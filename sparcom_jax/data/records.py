"""The instruction record and the validation every loader shares.

A record follows HexaInst's layout: one instruction of one of the six SPARCOM
categories, an optional input (context the instruction refers to) and the
reference response. Validation turns a raw row (a dict from any file format or
adapter) into a `Record`, or into a `Problem` that says where the row is and how
to fix it, so strict and lenient loading share one set of rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections import Counter
from typing import Any, Mapping, Sequence

from sparcom_jax.categories import CATEGORIES, SHORT_NAMES, normalize_category

#: Fields a row must carry (after field mapping / adapters).
REQUIRED_FIELDS: tuple[str, ...] = ("id", "category", "instruction", "output")
#: Fields a row may carry; missing or null means "".
OPTIONAL_FIELDS: tuple[str, ...] = ("input", "source")


class DataWarning(UserWarning):
    """Warnings about records skipped, excluded or truncated."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One instruction.

    Attributes:
      id: unique identifier within a loaded set (derived from the file name and
        position when the file has no id column; see `load_instructions`).
      category: canonical category name (see `sparcom_jax.categories.CATEGORIES`).
      instruction: the instruction text; never empty.
      input: optional context the instruction refers to ("" when absent).
      output: the reference response (used under teacher forcing).
      source: where the record comes from (e.g. "human", "generated", "dolly").
    """

    id: str
    category: str
    instruction: str
    input: str = ""
    output: str = ""
    source: str = ""

    def __post_init__(self):
        # Records built in code get the same guarantees as loaded ones.
        object.__setattr__(self, "category", normalize_category(self.category))
        if not str(self.instruction).strip():
            raise ValueError(f"record {self.id!r}: empty instruction")

    @property
    def short_category(self) -> str:
        """The short category name (CLS, CODE, QA, GEN, MATH, SUM)."""
        return SHORT_NAMES[self.category]


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why one row was rejected.

    Attributes:
      file: the file (or directory) the row comes from.
      where: its position, e.g. "12" (a line) or "row 3".
      what: what is wrong.
      fix: how to fix it.
    """

    file: str
    where: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}:{self.where}: {self.what}; {self.fix}"


@dataclasses.dataclass(frozen=True)
class Excluded:
    """A valid row deliberately left out (e.g. a Dolly category outside the six)."""

    file: str
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.where}: {self.reason}"


@dataclasses.dataclass
class LoadReport:
    """What `load_instructions` read, kept, skipped and excluded.

    Attributes:
      files: the files read, in order.
      n_rows: rows read over all files.
      skipped: invalid rows skipped in lenient mode (empty in strict mode).
      excluded: valid rows left out on purpose (categories outside the six,
        or outside `categories=`), with the reason.
      n_loaded: records returned (after any balanced sampling).
      repeated: the ids of each set of returned records of one category alike in instruction,
        input and response (`find_duplicates`), first id first.
      cross_category: the ids of each set of returned records sharing one instruction text
        under two or more categories (`find_duplicates`), first id first.
    """

    files: list[str] = dataclasses.field(default_factory=list)
    n_rows: int = 0
    skipped: list[Problem] = dataclasses.field(default_factory=list)
    excluded: list[Excluded] = dataclasses.field(default_factory=list)
    n_loaded: int = 0
    repeated: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    cross_category: list[tuple[str, ...]] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        copies = sum(len(g) - 1 for g in self.repeated)
        dups = (f"; {copies} repeat another record, {len(self.cross_category)} instruction text(s) under "
                "two or more categories" if copies or self.cross_category else "")
        return (
            f"read {self.n_rows} rows from {len(self.files)} file(s): "
            f"{self.n_loaded} loaded, {len(self.skipped)} skipped as invalid, "
            f"{len(self.excluded)} excluded{dups}"
        )


def _is_missing(value: Any) -> bool:
    # CSV readers turn empty cells into NaN; treat them like null.
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_text(value: Any) -> str | None:
    """Scalars become text (CSV ids are numbers); containers are rejected (None)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    return None


def label_map(category_map: Mapping[Any, str] | None) -> dict[str, str] | None:
    """`category_map` keyed by the text a file's label is read as (`_as_text`): a key 0 or 2.0 (an
    unquoted number in YAML) maps the label "0" or "2", as a key "0" would. A key no label can be
    read as (YAML reads unquoted true/false/yes/no/on/off, null and dates as such) is refused with
    the fix, and so are two keys read as one label."""
    if not category_map:
        return None
    out: dict[str, str] = {}
    first: dict[str, Any] = {}
    for key, category in category_map.items():
        text = _as_text(key)
        if text is None:
            raise ValueError(f"category_map: the key {key!r} ({type(key).__name__}) can never be a file's label (YAML "
                             "reads unquoted true/false/yes/no/on/off, null and dates as such); give the label as the "
                             "file writes it, as text (e.g. 'yes', not True)")
        text = text.strip()
        if text in out and out[text] != category:
            raise ValueError(f"category_map: the keys {first[text]!r} and {key!r} are both the label {text!r}, mapped to "
                             f"{out[text]!r} and {category!r}; keep one")
        out[text], first[text] = category, key
    return out


def validate_row(
    row: Mapping[str, Any],
    file: str,
    where: str,
    category_map: Mapping[str, str] | None = None,
    columns: Mapping[str, str] | None = None,
) -> Record | Problem:
    """Turn a raw row into a Record, or say what is wrong with it.

    Args:
      row: a mapping with at least the required fields (already renamed to the
        record's field names).
      file: the file name, for messages.
      where: the row's position in the file ("12" for line 12, "row 3", ...).
      category_map: optional raw label -> category name mapping applied before
        `normalize_category` (e.g. {"open_qa": "general_qa"}).
      columns: optional record field -> file column names, so messages name the
        column the user sees in the file (e.g. {"instruction": "question"}).

    Returns:
      The Record, or a Problem naming the file, the position and the fix.
    """
    columns = columns or {}

    def name(field: str) -> str:
        col = columns.get(field, field)
        return repr(field) if col == field else f"{field!r} (column {col!r})"

    values: dict[str, str] = {}
    for field in REQUIRED_FIELDS + OPTIONAL_FIELDS:
        raw = row.get(field)
        if _is_missing(raw):
            if field in REQUIRED_FIELDS:
                col = columns.get(field, field)
                if col != field:
                    fix = f"add a {col!r} value to this record"
                elif field == "id":  # ids are derived only for a whole file without them
                    fix = ("give this record an 'id', or leave 'id' out of every record of the "
                           "file to get ids made from the file name and line")
                else:
                    fix = (f"add a {field!r} value, or map the column that holds it with "
                           f"fields={{{field!r}: '<column>'}} (data.fields in a config)")
                return Problem(file, where, f"missing required field {name(field)}", fix)
            values[field] = ""
            continue
        text = _as_text(raw)
        if text is None:
            return Problem(
                file, where, f"field {name(field)} must be text, got {type(raw).__name__}",
                "store it as a string",
            )
        values[field] = text
    if not values["id"].strip():
        return Problem(file, where, f"empty {name('id')}", "give every record a non-empty unique id")
    if not values["instruction"].strip():
        return Problem(
            file, where, f"empty {name('instruction')}",
            "write the instruction text or remove the record",
        )
    label = values["category"].strip()
    if category_map and label in category_map:
        label = category_map[label]
    try:
        values["category"] = normalize_category(label)
    except ValueError as err:
        return Problem(
            file, where, str(err).rstrip("."),
            "use one of the valid category names, or map your labels with category_map= (data.category_map in "
            "a config)",
        )
    values["id"] = values["id"].strip()
    return Record(**values)


# What reads a record's reference response, as `check_responses` says it: (the records, what is
# done with the response tokens, to a record without one, the other way out than responses).
_RESPONSE_USES = {
    "causal check": ("held-out", "the causal check scores", "scored on",
                     "turn the causal check off (ablation.enabled: false in a config)"),
    "fine-tuning": ("training", "fine-tuning trains on", "trained on",
                    "leave those records out of the training records"),
}


def check_responses(records: Sequence, use: str = "causal check") -> None:
    """Refuse records of which a category has no reference response at all, and warn about the
    ones without among others (a `DataWarning`), naming the categories and records.

    The causal check scores each category's loss on the response tokens of its held-out
    records, and fine-tuning trains on those of its training records; a record whose `output`
    is empty (or blank), allowed for counting prompts, keeps only its end-of-sequence token
    (after any blank text) there, so a category of such records would be scored (tuned) on that
    token alone, and each such record among others dilutes its category's loss.

    Args:
      records: `Record`s (as `as_records` returns them).
      use: "causal check" or "fine-tuning" (the wording of the messages).

    Raises:
      ValueError: a category whose records all lack a response.
    """
    part, reads, done, off = _RESPONSE_USES[use]
    empty = [r for r in records if not r.output.strip()]
    if not empty:
        return
    missing, every = Counter(r.category for r in empty), Counter(r.category for r in records)
    per = ", ".join(f"{SHORT_NAMES[c]} {missing[c]} of {every[c]}" for c in CATEGORIES if missing[c])
    what = (f"{len(empty)} of {len(records)} {part} records have no reference response ('output' is empty: {per}; "
            f"e.g. {', '.join(repr(r.id) for r in empty[:3])}): {reads} the response tokens, so such a record is "
            f"{done} its end-of-sequence token alone (after any blank text), not on a response")
    unscored = [c for c in CATEGORIES if missing[c] and missing[c] == every[c]]
    if unscored:
        raise ValueError(f"{what}, and {', '.join(f'{SHORT_NAMES[c]} ({c})' for c in unscored)} would be {done} "
                         f"nothing else; give those records their responses (the 'output' field), or {off}")
    warnings.warn(f"{what}; give them their responses, or leave them out", DataWarning, stacklevel=3)


def normalise_text(text: str) -> str:
    """Text as copies are told apart (and the split groups identical instructions):
    lower-cased, whitespace collapsed, ends stripped.

    str.split splits on the characters the regular expression `\\s+` matches (checked over
    every code point), five times faster: group keys, and so stored group ids, are those of
    `re.sub(r"\\s+", " ", text.strip().lower())`.
    """
    return " ".join(text.lower().split())


def _hash(*texts: str) -> bytes:
    """A 128-bit digest of the normalised texts (what the duplicate search keeps per record)."""
    return hashlib.blake2b("\0".join(map(normalise_text, texts)).encode(), digest_size=16).digest()


def find_duplicates(records: Sequence[Record]) -> tuple[list[list[int]], list[list[int]]]:
    """The records that repeat one another, found by hashing their normalised fields (linear).

    Returns:
      (repeated, cross_category), lists of index groups, each ascending and in the order of its
      first record: repeated, the records of one category alike in instruction, input and
      response (`normalise_text`) under different ids; cross_category, the records sharing one
      instruction text (`normalise_text`, whatever their input) when it is under two or more
      categories.
    """
    same: dict[bytes, list[int]] = {}
    text: dict[bytes, list[int]] = {}
    for i, r in enumerate(records):
        same.setdefault(_hash(r.category, r.instruction, r.input, r.output), []).append(i)
        text.setdefault(_hash(r.instruction), []).append(i)
    return ([g for g in same.values() if len(g) > 1],
            [g for g in text.values() if len({records[i].category for i in g}) > 1])


def _one_prompt_twice(records: Sequence[Record], group: list[int]) -> bool:
    """Whether records of `group` (one instruction text) under two categories have one input too."""
    cats: dict[bytes, set[str]] = {}
    for i in group:
        cats.setdefault(_hash(records[i].instruction, records[i].input), set()).add(records[i].category)
    return any(len(c) > 1 for c in cats.values())


def _examples(records: Sequence[Record], groups: list[list[int]], where: Mapping[str, str],
              category: bool) -> str:
    """The first three groups, each as "'a' (file:line) and 'b' (file:line)" (the category after
    each id when `category`), at most three records a group."""
    def one(i: int) -> str:
        r = records[i]
        at = [r.category] if category else []
        at += [where[r.id]] if r.id in where else []
        return repr(r.id) + (f" ({', '.join(at)})" if at else "")

    said = []
    for g in groups[:3]:
        ids = [one(i) for i in g[:3]]
        said.append(", ".join(ids[:-1]) + f" and {ids[-1]}" + (f" (+{len(g) - 3} more)" if len(g) > 3 else ""))
    return "; ".join(said)


def check_duplicates(records: Sequence[Record], where: Mapping[str, str] | None = None
                     ) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Warn, once per case, about records that repeat one another (`find_duplicates`): a
    `DataWarning` naming how many, the first ids with their file and line, what the copies do
    to the results and the fix.

    Args:
      records: the loaded records.
      where: id -> "file:line" (or "file:row n"), named beside the ids when given.

    Returns:
      (repeated, cross_category): the ids of each group (`LoadReport`).
    """
    where = where or {}
    repeated, crossed = find_duplicates(records)
    if repeated:
        copies = Counter(records[g[0]].category for g in repeated for _ in g[1:])
        per = ", ".join(f"{SHORT_NAMES[c]} {copies[c]}" for c in CATEGORIES if copies[c])
        warnings.warn(
            f"{sum(copies.values())} record(s) repeat another record of their category under another id "
            f"(instruction, input and response alike, case and spacing ignored; {per}; e.g. "
            f"{_examples(records, repeated, where, category=False)}): each copy counts as an instruction of its "
            "own, so a repeated record weighs once per copy in its category's sets (the consensus share, the pooled "
            "mean), counts and instruction-level overlaps (a copy pair has Jaccard 1); the split keeps copies in "
            "one part and the bootstrap and permutation tests (identify.resample: group) draw them as one, but "
            "every point estimate counts each copy; keep one record of each (remove the other ids)",
            DataWarning, stacklevel=3)
    if crossed:
        cats = Counter(c for g in crossed for c in sorted({records[i].category for i in g}))
        per = ", ".join(f"{SHORT_NAMES[c]} {cats[c]}" for c in CATEGORIES if cats[c])
        prompts = sum(_one_prompt_twice(records, g) for g in crossed)
        warnings.warn(
            f"{len(crossed)} instruction text(s) appear under two or more categories ({sum(map(len, crossed))} "
            f"records; texts per category: {per}; {prompts} of the texts with one input under two categories too, "
            f"the same prompt; case and spacing ignored; e.g. {_examples(records, crossed, where, category=True)}): "
            "such a text counts as an instruction of each of its categories, so their sets share what it "
            "activates (their overlap is inflated, their uniqueness lowered), and the same prompt under two "
            "labels contradicts itself; a split (data.split) keeps all records of such a text in one part, so "
            "none is identified on for one category and held out or fine-tuned on for another; give each text "
            "the one category it belongs to (relabel or remove the other copies)",
            DataWarning, stacklevel=3)
    return tuple([tuple(records[i].id for i in g) for g in groups] for groups in (repeated, crossed))
