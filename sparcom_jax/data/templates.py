"""Format records for a model, tokenize them and mark the token scope.

Every sequence is the formatted prompt followed by the reference response
(teacher forcing), so one set of ids serves every scope; the scope mask picks
the tokens that count (METHOD.md, "Token scope"):

- "prompt" (default, as in the paper): the prompt tokens, template included;
- "content": only the tokens of the instruction and the input text: no BOS, role
  markers, system prompt or template text. The same record has the same content
  under any template, so a before/after comparison across templates counts the
  same text (the default of experiment configs);
- "response": the response tokens, including the end-of-response token(s);
- "all": every token.

Content tokens are found by character offsets: the prompt is tokenized as one text
(as the model sees it in use), and a token is content when its characters overlap
the instruction or the input (a token that merges a template character with the
first content character counts as content). This needs a fast tokenizer.

Plain template (for base models)::

    <bos>### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {output}<eos>

The "### Input:" block is left out when the input is empty. BOS/EOS are added
when the tokenizer defines them. The prompt (up to and including
"### Response:\\n") and the response are tokenized separately, so the boundary
never falls inside a token.

Chat template (for chat models): the tokenizer's own template, through
`apply_chat_template`, on [user: instruction (+ "\\n\\n" + input), assistant:
output]. The prompt is the user turn rendered with `add_generation_prompt=True`;
it must be a prefix of the full conversation (checked on the ids, then on the
text), otherwise a ValueError explains that the template cannot be split.

Truncation keeps the first `max_length` tokens (the response is cut first) and is
never silent: `encode_record` warns for its record, `encode_records` warns once
with the count (and, under scope "content", how many records lost content tokens).

Truncation and templates: a prompt cut to `max_length` keeps fewer content tokens
under a template with a longer header (plain's "### Instruction:" header is longer
than the chat prefix), so two templates would count different parts of a long
record. `content_caps` gives, per record, the fewest content tokens that survive
under any of a study's (tokenizer, template) pairs; `encode_records(...,
content_caps=...)` then counts only that many, the first ones, under every pair.
Caps matter only when counts made under different templates or tokenizers are
compared; the pipeline's collect stage computes them for every study.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np

from sparcom_jax.categories import per_category_text
from sparcom_jax.data.records import DataWarning, Record

Template = Literal["plain", "chat"]
Scope = Literal["prompt", "content", "response", "all"]
TEMPLATES: tuple[str, ...] = ("plain", "chat")
SCOPES: tuple[str, ...] = ("prompt", "content", "response", "all")

PLAIN_INSTRUCTION = "### Instruction:\n{instruction}\n\n"
PLAIN_INPUT = "### Input:\n{input}\n\n"
PLAIN_RESPONSE = "### Response:\n"


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized record.

    Attributes:
      ids: int32 [T] prompt then response token ids.
      scope: bool [T] tokens in the requested scope.
      prompt_len: number of prompt tokens (ids[:prompt_len] is the prompt).
      truncated: whether the sequence was cut to max_length.
      content_cut: content tokens of the record left out of the scope, by truncation or
        by the content cap (0 unless scope="content").
      capped: of those, the ones the content cap left out after truncation had kept them.
    """

    ids: np.ndarray
    scope: np.ndarray
    prompt_len: int
    truncated: bool
    content_cut: int = 0
    capped: int = 0

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclasses.dataclass(repr=False)
class EncodedSet:
    """Tokenized records, in input order.

    Attributes:
      ids: N int32 arrays [T_n].
      scopes: N bool arrays [T_n], aligned with `ids`.
      prompt_lens: int [N] prompt tokens per sequence.
      record_ids: N record ids.
      categories: N canonical categories.
      n_truncated: sequences cut to max_length.
      truncated_ids: the ids of those records.
      template, scope: how the set was made.
      content_cut: int [N] content tokens of each record left out (see `Encoded`).
      capped: int [N] of those, the ones left out by the content cap.
    """

    ids: list[np.ndarray]
    scopes: list[np.ndarray]
    prompt_lens: np.ndarray
    record_ids: list[str]
    categories: list[str]
    n_truncated: int
    truncated_ids: list[str]
    template: str
    scope: str
    content_cut: np.ndarray
    capped: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        n = np.asarray(self.lengths)
        lengths = f"{n.min()}-{n.max()} tokens (mean {n.mean():.0f})" if n.size else "no sequences"
        return (f"EncodedSet: {len(self)} records ({per_category_text(collections.Counter(self.categories))}), "
                f"template {self.template!r}, scope {self.scope!r}, {lengths}, {self.n_truncated} truncated")

    @property
    def lengths(self) -> np.ndarray:
        """int [N] sequence lengths."""
        return np.array([len(x) for x in self.ids], dtype=np.int32)


def user_message(record: Record) -> str:
    """The user turn of the chat template: the instruction, then the input if any."""
    return f"{record.instruction}\n\n{record.input}" if record.input else record.instruction


def format_plain(record: Record) -> tuple[str, str]:
    """The plain template's prompt and response text (without BOS/EOS)."""
    prompt = PLAIN_INSTRUCTION.format(instruction=record.instruction)
    if record.input:
        prompt += PLAIN_INPUT.format(input=record.input)
    return prompt + PLAIN_RESPONSE, record.output


def _tok(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def content_spans(record: Record, user_start: int) -> list[tuple[int, int]]:
    """Character spans [start, end) of the instruction and the input in the chat prompt,
    where the user message (`user_message(record)`) starts, unaltered, at `user_start`
    (`_user_start` checks that it does)."""
    spans = [(user_start, user_start + len(record.instruction))]
    if record.input:
        start = user_start + len(record.instruction) + 2  # the "\n\n" between them
        spans.append((start, start + len(record.input)))
    return spans


def _plain_ids(record: Record, tokenizer) -> tuple[list[int], list[int], str, list, int]:
    prompt, response = format_plain(record)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    spans = [(len("### Instruction:\n"), len("### Instruction:\n") + len(record.instruction))]
    if record.input:
        start = prompt.index(PLAIN_INPUT.format(input=record.input)) + len("### Input:\n")
        spans.append((start, start + len(record.input)))
    return bos + _tok(tokenizer, prompt), _tok(tokenizer, response) + eos, prompt, spans, len(bos)


# Stands in for the user message when the chat template is rendered to locate it: private-use
# characters that no template text contains.
_SENTINEL = "\ue000sparcom user message\ue001"


def _user_start(tokenizer, message: str, prompt_text: str) -> int | None:
    """Where the user message starts in `prompt_text`, the chat prompt rendered with it; None
    when the template alters the message's text.

    Searching `prompt_text` for the message would find the wrong place when the message is
    short and also part of template text after it (instruction "s" inside "<|assistant|>").
    Instead the prompt is rendered again with a sentinel for the message: the text around the
    sentinel is the template's, so the last sentinel (a system prompt before the user turn may
    quote the message) gives the position, once the message put back in every sentinel's
    place reproduces `prompt_text` exactly.
    """
    marked = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                           add_generation_prompt=True)
    parts = marked.split(_SENTINEL)
    if len(parts) < 2 or message.join(parts) != prompt_text:
        return None
    return len(message.join(parts[:-1]))


def _chat_ids(record: Record, tokenizer) -> tuple[list[int], list[int], str, list, int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "use template='plain' or a tokenizer with a chat template"
        )
    user = {"role": "user", "content": user_message(record)}
    full_msgs = [user, {"role": "assistant", "content": record.output}]
    prompt_text = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(full_msgs, tokenize=False)
    # The templated text already holds BOS etc.; tokenizing it must not add more.
    prompt_ids, full_ids = _tok(tokenizer, prompt_text), _tok(tokenizer, full_text)
    user_start = _user_start(tokenizer, user["content"], prompt_text)
    spans = content_spans(record, user_start) if user_start is not None else None
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids):], prompt_text, spans, 0
    if full_text.startswith(prompt_text):
        # A merge across the boundary: tokenize the two halves apart instead.
        return prompt_ids, _tok(tokenizer, full_text[len(prompt_text):]), prompt_text, spans, 0
    raise ValueError(
        f"record {record.id!r}: the chat template renders the prompt (with "
        "add_generation_prompt=True) differently from the start of the full conversation, "
        "so prompt and response tokens cannot be told apart; use template='plain' or a "
        "chat template whose generation prompt matches the assistant turn"
    )


def _encode(record: Record, tokenizer, template: str, scope: str,
            max_length: int | None, content_cap: int | None = None) -> Encoded:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; use one of {TEMPLATES}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; use one of {SCOPES}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    prompt, response, prompt_text, spans, offset = (_plain_ids if template == "plain" else _chat_ids)(
        record, tokenizer)
    ids = np.asarray(prompt + response, dtype=np.int32)
    prompt_len = len(prompt)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids = ids[:max_length]
        prompt_len = min(prompt_len, max_length)
    pos = np.arange(len(ids))
    content_cut = capped = 0
    if scope == "prompt":
        mask = pos < prompt_len
    elif scope == "content":
        mask = np.zeros(len(ids), dtype=np.bool_)
        inside = _content_tokens(record, tokenizer, prompt_text, spans, prompt[offset:])
        mask[offset:offset + len(inside)] = inside[: max(0, len(ids) - offset)]
        if content_cap is not None:
            beyond = np.flatnonzero(mask)[content_cap:]
            mask[beyond] = False
            capped = len(beyond)
        content_cut = int(inside.sum() - mask.sum())
    elif scope == "response":
        mask = pos >= prompt_len
    else:
        mask = np.ones(len(ids), dtype=np.bool_)
    return Encoded(ids=ids, scope=mask.astype(np.bool_), prompt_len=prompt_len, truncated=truncated,
                   content_cut=content_cut, capped=capped)


def _content_tokens(record: Record, tokenizer, text: str, spans, ids: list[int]) -> np.ndarray:
    """bool [len(ids)]: which tokens of the tokenized `text` overlap a content span."""
    if spans is None:
        raise ValueError(
            f"record {record.id!r}: the chat template changes the user message's text, so its "
            "instruction tokens cannot be located; use scope='prompt' or another template")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("scope='content' needs a fast tokenizer (character offsets); load the "
                         "tokenizer with use_fast=True or use scope='prompt'")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise ValueError(f"record {record.id!r}: the prompt's tokens changed between two tokenizations")
    inside = np.zeros(len(ids), dtype=np.bool_)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a:
            inside[i] = any(a < e and s < b for s, e in spans)
        else:
            # A tokenizer that trims offsets (ByteLevel trim_offsets=True) gives a token of
            # spaces the empty span (b, b) at its end: it is content when its last character is.
            inside[i] = any(s < b <= e for s, e in spans)
    return inside


def encode_record(
    record: Record,
    tokenizer,
    *,
    template: Template = "plain",
    scope: Scope = "prompt",
    max_length: int | None = None,
) -> Encoded:
    """Tokenize one record as prompt + reference response and mark the scope.

    Args:
      record: the instruction.
      tokenizer: a transformers tokenizer.
      template: "plain" (base models) or "chat" (the tokenizer's chat template).
      scope: which tokens count: "prompt", "content" (instruction and input text
        only), "response" or "all".
      max_length: cut sequences longer than this (with a warning).

    Returns:
      Encoded with ids int32 [T] and scope bool [T].
    """
    enc = _encode(record, tokenizer, template, scope, max_length)
    if enc.truncated:
        warnings.warn(f"record {record.id!r} truncated to max_length={max_length}",
                      DataWarning, stacklevel=2)
    return enc


def encode_records(
    records: Sequence[Record],
    tokenizer,
    *,
    template: Template = "plain",
    scope: Scope = "prompt",
    max_length: int | None = None,
    content_caps: Mapping[str, int] | None = None,
) -> EncodedSet:
    """Tokenize many records; one DataWarning reports how many were truncated.

    Args:
      records, tokenizer, template, scope, max_length: as in `encode_record`.
      content_caps: {record id: K} (from `content_caps`, scope="content" only): count
        only the first K content tokens of each record, so that every template and
        tokenizer of a study counts the same number of them.

    Returns:
      EncodedSet with N id arrays int32 [T_n] and N aligned scope masks bool [T_n].
    """
    if content_caps is not None:
        if scope != "content":
            raise ValueError(f"content_caps apply to scope='content' only, not scope={scope!r}")
        bad = [r.id for r in records if not content_caps.get(r.id, -1) >= 0]
        if bad:
            raise ValueError(f"content_caps has no cap >= 0 for {len(bad)} record(s) (first: {bad[0]!r}); "
                             "compute them with content_caps() on the same records")
    encs = [_encode(r, tokenizer, template, scope, max_length,
                    None if content_caps is None else int(content_caps[r.id])) for r in records]
    cut = [r.id for r, e in zip(records, encs) if e.truncated]
    if cut:
        shown = ", ".join(map(repr, cut[:10])) + (", ..." if len(cut) > 10 else "")
        lost = sum(e.content_cut > 0 for e in encs)
        content = (f"; {lost} of them lost instruction/input tokens, which are not counted"
                   if scope == "content" else "")
        warnings.warn(
            f"truncated {len(cut)} of {len(records)} sequences to max_length={max_length} "
            f"({shown}){content}; raise max_length to keep them whole",
            DataWarning, stacklevel=2,
        )
    return EncodedSet(
        ids=[e.ids for e in encs],
        scopes=[e.scope for e in encs],
        prompt_lens=np.array([e.prompt_len for e in encs], dtype=np.int32),
        record_ids=[r.id for r in records],
        categories=[r.category for r in records],
        n_truncated=len(cut),
        truncated_ids=cut,
        template=template,
        scope=scope,
        content_cut=np.array([e.content_cut for e in encs], dtype=np.int64),
        capped=np.array([e.capped for e in encs], dtype=np.int64),
    )


def content_caps(records: Sequence[Record], pairs: Iterable[tuple[object, str]], *,
                 max_length: int | None) -> dict[str, int]:
    """Per record, the fewest content tokens that survive truncation under any of `pairs`.

    Passed to `encode_records(content_caps=...)` for every pair, they make every template
    and tokenizer of a study count the same number of content tokens of each record,
    the first ones (see the module docstring).

    Args:
      records: the records counted.
      pairs: (tokenizer, template) of every model and template the counts are compared
        across.
      max_length: the truncation of the counts.

    Returns:
      {record id: K_r}, K_r >= 0.
    """
    caps: np.ndarray | None = None
    for tokenizer, template in pairs:
        kept = np.array([int(_encode(r, tokenizer, template, "content", max_length).scope.sum())
                         for r in records], dtype=np.int64)
        caps = kept if caps is None else np.minimum(caps, kept)
    if caps is None:
        raise ValueError("content_caps needs at least one (tokenizer, template) pair")
    return {r.id: int(k) for r, k in zip(records, caps)}
