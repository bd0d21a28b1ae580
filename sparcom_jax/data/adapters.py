"""Adapters from local copies of public instruction sets to SPARCOM's six categories.

Each adapter turns one raw row of a known public format into the record fields
(`id`, `category`, `instruction`, `input`, `output`, `source`); the shared
validation in `records.py` then checks the result, so every adapter reports bad
rows the same way. An adapter may also *exclude* a valid row whose category has
no SPARCOM counterpart (Dolly's information_extraction); the loader reports
every exclusion.

| adapter      | columns read                                   | category            |
|--------------|------------------------------------------------|---------------------|
| `dolly`      | instruction, context, response, category       | mapped, see below   |
| `alpaca`     | instruction, input, output, category (+id)     | from the column     |
| `gsm8k`      | question, answer                               | math                |
| `mbpp`       | task_id, text, code, test_list                 | code                |
| `humaneval`  | task_id, prompt, canonical_solution            | code                |
| `codealpaca` | instruction, input, output                     | code                |

Dolly-15k categories: classification -> classification, summarization ->
summarization, open_qa / closed_qa / general_qa -> general_qa, creative_writing /
brainstorming -> generation; information_extraction is excluded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from sparcom_jax.data.records import REQUIRED_FIELDS

#: Dolly-15k category -> SPARCOM category.
DOLLY_CATEGORIES: dict[str, str] = {
    "classification": "classification",
    "summarization": "summarization",
    "open_qa": "general_qa",
    "closed_qa": "general_qa",
    "general_qa": "general_qa",
    "creative_writing": "generation",
    "brainstorming": "generation",
}
#: Dolly-15k categories deliberately left out (no counterpart among the six).
DOLLY_EXCLUDED: frozenset[str] = frozenset({"information_extraction"})

HUMANEVAL_INSTRUCTION = "Complete the following Python function."

# A convert function gets (row, row_number, file_stem) and returns the record
# fields, or a string: the reason to exclude the row.
Convert = Callable[[Mapping[str, Any], int, str], "dict[str, Any] | str"]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How to read one public format.

    Attributes:
      name: the name passed as `adapter=` to `load_instructions`.
      required: columns every file must have.
      convert: row -> record fields (or an exclusion reason).
      columns: record field -> source column, so error messages name the
        column the user sees in the file.
    """

    name: str
    required: tuple[str, ...]
    convert: Convert
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _dolly(row, n, stem):
    label = row.get("category")
    key = str(label).strip().lower() if label is not None else None
    if key in DOLLY_EXCLUDED:
        return f"Dolly category {key!r} has no SPARCOM counterpart"
    return {
        "id": f"dolly-{stem}-{n}",
        "category": DOLLY_CATEGORIES.get(key, label),  # unknown labels fail validation with a hint
        "instruction": row.get("instruction"),
        "input": row.get("context"),
        "output": row.get("response"),
        "source": "dolly",
    }


def _alpaca(row, n, stem):
    rid = row.get("id")
    return {
        "id": rid if rid is not None else f"alpaca-{stem}-{n}",
        "category": row.get("category"),
        "instruction": row.get("instruction"),
        "input": row.get("input"),
        "output": row.get("output"),
        "source": row.get("source") or "alpaca",
    }


def _gsm8k(row, n, stem):
    return {
        "id": f"gsm8k-{stem}-{n}",
        "category": "math",
        "instruction": row.get("question"),
        "output": row.get("answer"),
        "source": "gsm8k",
    }


def _tests_text(tests: Any) -> str:
    if tests is None:
        return ""
    if isinstance(tests, str):
        return tests
    return "\n".join(str(t) for t in tests)


def _mbpp(row, n, stem):
    tid = row.get("task_id")
    tests = _tests_text(row.get("test_list"))
    return {
        "id": f"mbpp-{tid if tid is not None else f'{stem}-{n}'}",
        "category": "code",
        "instruction": row.get("text"),
        # MBPP's prompt shows the tests the code must pass; keep them as the input.
        "input": f"Your code should pass these tests:\n{tests}" if tests else "",
        "output": row.get("code"),
        "source": "mbpp",
    }


def _humaneval(row, n, stem):
    tid = row.get("task_id")
    prompt = row.get("prompt")
    return {
        "id": tid if tid is not None else f"humaneval-{stem}-{n}",
        "category": "code",
        # The prompt is a signature plus docstring; the instruction says what to do with it.
        "instruction": HUMANEVAL_INSTRUCTION if prompt is not None else None,
        "input": prompt,
        "output": row.get("canonical_solution"),
        "source": "humaneval",
    }


def _codealpaca(row, n, stem):
    return {
        "id": f"codealpaca-{stem}-{n}",
        "category": "code",
        "instruction": row.get("instruction"),
        "input": row.get("input"),
        "output": row.get("output"),
        "source": "codealpaca",
    }


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        Adapter("dolly", ("instruction", "context", "response", "category"), _dolly,
                {"input": "context", "output": "response"}),
        Adapter("alpaca", ("instruction", "output", "category"), _alpaca),
        Adapter("gsm8k", ("question", "answer"), _gsm8k,
                {"instruction": "question", "output": "answer"}),
        Adapter("mbpp", ("text", "code"), _mbpp, {"instruction": "text", "output": "code"}),
        Adapter("humaneval", ("prompt", "canonical_solution"), _humaneval,
                {"instruction": "prompt", "output": "canonical_solution"}),
        Adapter("codealpaca", ("instruction", "output"), _codealpaca),
    )
}


def get_adapter(name: str) -> Adapter:
    """Return the adapter called `name` (case-insensitive)."""
    key = name.strip().lower()
    if key not in ADAPTERS:
        raise ValueError(
            f"unknown adapter {name!r}; use one of {sorted(ADAPTERS)}, 'auto', or None "
            "for files already in the record format"
        )
    return ADAPTERS[key]


def detect_adapter(columns: Sequence[str]) -> str | None:
    """Guess the format from a file's column names.

    Returns:
      An adapter name, or None when the columns already are the record format
      (id, category, instruction, output).

    Raises:
      ValueError: when no format matches.
    """
    cols = set(columns)
    if set(REQUIRED_FIELDS) <= cols:
        return None
    for name in ("dolly", "gsm8k", "humaneval", "mbpp", "alpaca"):  # the first match wins
        if set(ADAPTERS[name].required) <= cols:
            return name
    # instruction/output without a category (CodeAlpaca, plain Alpaca) is ambiguous:
    # labelling it all "code" could be wrong, so the user must say adapter="codealpaca".
    raise ValueError(
        f"cannot tell the format from the columns {sorted(cols)}; pass adapter= "
        f"(one of {sorted(ADAPTERS)}) or map the columns with fields="
    )
