"""The six SPARCOM instruction categories and their accepted names."""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping, Sequence

CATEGORIES: tuple[str, ...] = (
    "classification",
    "code",
    "general_qa",
    "generation",
    "math",
    "summarization",
)
SHORT_NAMES: dict[str, str] = {
    "classification": "CLS",
    "code": "CODE",
    "general_qa": "QA",
    "generation": "GEN",
    "math": "MATH",
    "summarization": "SUM",
}
_ALIASES: dict[str, str] = {
    **{c: c for c in CATEGORIES},
    **{s.lower(): c for c, s in SHORT_NAMES.items()},
    "general-qa": "general_qa",
    "generalqa": "general_qa",
    "qa": "general_qa",
    "summarisation": "summarization",
}


def normalize_category(name: str) -> str:
    """Return the canonical category name for `name` (long or short, any case).

    Raises:
      ValueError: naming the closest valid category when `name` is unknown.
    """
    key = str(name).strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    valid = ", ".join(f"{c} ({SHORT_NAMES[c]})" for c in CATEGORIES)
    if re.fullmatch(r"[+-]?\d+(\.\d*)?", key):
        raise ValueError(f"unknown category {name!r}: categories are names, not numbers: {valid}"
                         f"{_index_hint(key)}")
    letters = re.sub(r"[^a-z]", "", key)
    # Spelling slips only: fuzzy matching against the 2-3 letter short names, or at a low
    # cutoff, offered another dataset's labels a wrong category ('closed_qa' -> classification,
    # 'information_extraction' -> generation), a hint a user could accept without noticing.
    close = [letters] if letters in _ALIASES else difflib.get_close_matches(
        key, [a for a in _ALIASES if len(a) > 3], n=1, cutoff=0.5)
    hint = f"; did you mean {_ALIASES[close[0]]!r}?" if close else ""
    raise ValueError(f"unknown category {name!r}{hint or ';'} Valid categories: {valid}")


def _index_hint(number: str) -> str:
    """For a category given as a number: which category that index of CATEGORIES names
    (0-5), if the number may be one; the number itself is never accepted."""
    value = float(number)
    if not value.is_integer() or not 0 <= value < len(CATEGORIES):
        return ""
    i = int(value)
    return (f"; if {number} is an index into that list (from 0), it is {CATEGORIES[i]!r}: write "
            f"{CATEGORIES[i]!r} (a number is not read as an index: another dataset's labels may count from 1 "
            "or follow another order)")


def absent_categories(n_per_category: Mapping[str, Any] | Sequence[Any]) -> list[str]:
    """The categories without instructions, in CATEGORIES order: those whose count in
    `n_per_category` (a {category: n} mapping or a sequence in CATEGORIES order) is 0; a
    category left out or counted None is not known to be absent."""
    if not isinstance(n_per_category, Mapping):
        n_per_category = dict(zip(CATEGORIES, n_per_category))
    return [c for c in CATEGORIES if c in n_per_category and n_per_category[c] == 0]


def per_category_text(values: Mapping[str, Any] | Sequence[Any], unmeasured: Iterable[str] = ()) -> str:
    """"CLS 2, CODE 3, ..." for per-category values (a {category: value} mapping, where
    absent categories are left out, or a sequence in CATEGORIES order); for reprs.
    Categories in `unmeasured` (no instructions) show "-", not a value that reads as a finding."""
    if not isinstance(values, Mapping):
        values = dict(zip(CATEGORIES, values))
    unmeasured = set(unmeasured)
    return ", ".join(f"{SHORT_NAMES[c]} {'-' if c in unmeasured else values[c]}" for c in CATEGORIES if c in values)
