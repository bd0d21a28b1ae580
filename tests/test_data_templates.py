"""Templates, token scopes and truncation, with the shipped tokenizer."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

from sparcom_jax.data import (
    DataWarning,
    Record,
    default_tokenizer,
    encode_record,
    encode_records,
    format_plain,
)

WITH_INPUT = Record("a", "summarization", "Summarize the passage in one sentence.",
                    "The river rose after three days of rain, and the town closed the bridge.",
                    "Heavy rain flooded the river and shut the bridge.")
NO_INPUT = Record("b", "math", "What is 12 times 7?", "", "12 times 7 is 84.")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def dec(tok, ids):
    return tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


def test_plain_template_text():
    prompt, response = format_plain(WITH_INPUT)
    assert prompt == ("### Instruction:\nSummarize the passage in one sentence.\n\n"
                      "### Input:\nThe river rose after three days of rain, and the town closed the bridge.\n\n"
                      "### Response:\n")
    assert response == WITH_INPUT.output
    assert format_plain(NO_INPUT)[0] == "### Instruction:\nWhat is 12 times 7?\n\n### Response:\n"


@pytest.mark.parametrize("record", [WITH_INPUT, NO_INPUT], ids=["input", "no-input"])
def test_plain_scopes_line_up_with_ids(tok, record):
    prompt, response = format_plain(record)
    encs = {s: encode_record(record, tok, template="plain", scope=s) for s in ("prompt", "response", "all")}
    ids = encs["prompt"].ids
    assert ids.dtype == np.int32 and ids.ndim == 1
    for e in encs.values():  # the same ids serve every scope
        np.testing.assert_array_equal(e.ids, ids)
        assert e.scope.dtype == np.bool_ and e.scope.shape == ids.shape
    assert dec(tok, ids[encs["prompt"].scope]) == tok.bos_token + prompt
    assert dec(tok, ids[encs["response"].scope]) == response + tok.eos_token
    assert dec(tok, ids[encs["all"].scope]) == tok.bos_token + prompt + response + tok.eos_token
    # prompt and response masks partition the sequence at prompt_len
    np.testing.assert_array_equal(encs["prompt"].scope, ~encs["response"].scope)
    assert encs["prompt"].scope.sum() == encs["prompt"].prompt_len > 0


@pytest.mark.parametrize("record", [WITH_INPUT, NO_INPUT], ids=["input", "no-input"])
def test_chat_scopes_line_up_with_ids(tok, record):
    user = record.instruction + (f"\n\n{record.input}" if record.input else "")
    prompt_text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                          add_generation_prompt=True)
    assert prompt_text == f"<s><|user|>\n{user}\n<|assistant|>\n"
    p = encode_record(record, tok, template="chat", scope="prompt")
    r = encode_record(record, tok, template="chat", scope="response")
    np.testing.assert_array_equal(p.ids, r.ids)
    assert dec(tok, p.ids[p.scope]) == prompt_text
    assert dec(tok, r.ids[r.scope]) == record.output + tok.eos_token
    assert p.scope.sum() == p.prompt_len and r.scope.sum() == len(r) - p.prompt_len


def trimming_copy(tok):
    """The shipped tokenizer with a ByteLevel post-processor that trims offsets (as some
    public tokenizer.json files have): the same ids, but a token of spaces gets an empty
    offset span at its end."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    t.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=True), t.post_processor])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                   pad_token=tok.pad_token, chat_template=tok.chat_template,
                                   additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])


SPACED = Record("s", "code", "Fix  this   function:", "def f():\n    return  1", "def f():\n    return 1")


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_content_scope_is_the_instruction_and_input_tokens(tok, template):
    for record in (WITH_INPUT, NO_INPUT, SPACED):
        e = encode_record(record, tok, template=template, scope="content")
        # Every token from the first content token to the last is content, except the
        # "\n\n" (plain: and "### Input:\n") between instruction and input.
        between = "\n\n" if template == "chat" else "\n\n### Input:\n"
        assert dec(tok, e.ids[e.scope]) == record.instruction + (
            f"{record.input}" if record.input else "")
        first, last = np.flatnonzero(e.scope)[[0, -1]]
        assert dec(tok, e.ids[first:last + 1]) == record.instruction + (
            between + record.input if record.input else "")
    # Offsets trimmed of spaces: the tokens of spaces inside the content still count.
    trimmed = trimming_copy(tok)
    e, t = (encode_record(SPACED, k, template=template, scope="content") for k in (tok, trimmed))
    np.testing.assert_array_equal(t.ids, e.ids)
    np.testing.assert_array_equal(t.scope, e.scope)


# A chat template rendering "Q: {instruction}\nA: {response}".
QA_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}"
               "{% else %}{{ 'A: ' + m['content'] }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}")


def test_chat_template_boundary_merge_falls_back_to_text_split(tok):
    t = copy.deepcopy(tok)
    # The generation prompt ends in a space that the response's first word would absorb.
    t.chat_template = QA_TEMPLATE
    rec = Record("c", "general_qa", "Why is the sky blue?", output="The air scatters blue light most.")
    prompt = "Q: Why is the sky blue?\nA: "
    full_ids = t(prompt + rec.output, add_special_tokens=False)["input_ids"]
    prompt_ids = t(prompt, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] != prompt_ids  # the case the fallback is for
    e = encode_record(rec, t, template="chat", scope="response")
    assert dec(t, e.ids[: e.prompt_len]) == prompt
    assert dec(t, e.ids[e.scope]) == rec.output


def test_chat_template_that_cannot_be_split(tok):
    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    with pytest.raises(ValueError, match=r"record 'b': the chat template renders the prompt .* template='plain'"):
        encode_record(NO_INPUT, t, template="chat")
    t.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; use template='plain'"):
        encode_record(NO_INPUT, t, template="chat")


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="unknown scope 'prompts'"):
        encode_record(NO_INPUT, tok, scope="prompts")
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        encode_record(NO_INPUT, tok, template="alpaca")


def test_truncation_is_counted_and_never_silent(tok):
    long = Record("long", "generation", "Write a story. " * 40, "", "Once upon a time. " * 40)
    full = encode_record(long, tok, scope="response")
    p_len = full.prompt_len
    # long2's prompt is longer than long's, so it is cut as well.
    recs = [NO_INPUT, long, Record("long2", "code", long.instruction + " And more.", output="It adds.")]
    max_len = p_len - 3  # shorter than the long prompt: cuts inside it, no response left
    assert len(encode_record(NO_INPUT, tok)) < max_len
    with pytest.warns(DataWarning) as rec:
        s = encode_records(recs, tok, scope="response", max_length=max_len)
    msgs = [str(w.message) for w in rec if issubclass(w.category, DataWarning)]
    assert len(msgs) == 1 and msgs[0].startswith(f"truncated 2 of 3 sequences to max_length={max_len}")
    assert s.n_truncated == 2 and s.truncated_ids == ["long", "long2"]
    assert s.lengths.tolist()[1:] == [max_len, max_len]
    np.testing.assert_array_equal(s.ids[1], full.ids[:max_len])
    assert s.prompt_lens[1] == max_len and not s.scopes[1].any()  # response fully cut
    assert s.record_ids == ["b", "long", "long2"] and s.categories == ["math", "generation", "code"]
    # Cutting inside the response keeps the prompt and the start of the response.
    with pytest.warns(DataWarning, match="record 'long' truncated to max_length"):
        cut = encode_record(long, tok, scope="response", max_length=p_len + 5)
    assert cut.truncated and cut.prompt_len == p_len and int(cut.scope.sum()) == 5
    # No truncation, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = encode_records(recs[:1], tok, max_length=512)
    assert s.n_truncated == 0


def test_encode_records_matches_encode_record(tok):
    s = encode_records([WITH_INPUT, NO_INPUT], tok, template="chat", scope="all")
    for rec, ids, scope in zip([WITH_INPUT, NO_INPUT], s.ids, s.scopes):
        e = encode_record(rec, tok, template="chat", scope="all")
        np.testing.assert_array_equal(ids, e.ids)
        assert scope.all()


def test_chat_content_is_found_at_the_user_turn_not_in_later_template_text(tok):
    # "s" (and "ass") also occur in the "<|assistant|>" text after the user turn; the
    # content is the user message itself.
    for text in ("s", "ass", "assistant"):
        e = encode_record(Record("x", "math", text, output="ok"), tok, template="chat", scope="content")
        assert dec(tok, e.ids[e.scope]) == text
    # A system prompt that quotes the message before the user turn: the user turn is still found.
    t = copy.deepcopy(tok)
    t.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                       "{{ '<|system|>\\nAnswer: ' + m['content'] + '\\n<|user|>\\n' + m['content'] + '\\n' }}"
                       "{% else %}{{ '<|assistant|>\\n' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    rec = Record("q", "math", "What is 2 plus 2?", output="4")
    e = encode_record(rec, t, template="chat", scope="content")
    first = np.flatnonzero(e.scope)[0]
    assert dec(t, e.ids[e.scope]) == rec.instruction
    assert dec(t, e.ids[:first]).endswith("<|user|>\n")


def test_content_caps_make_templates_count_the_same_content_tokens(tok):
    from sparcom_jax.data import content_caps

    recs = [WITH_INPUT, NO_INPUT, SPACED]
    full = {t: encode_records(recs, tok, template=t, scope="content") for t in ("plain", "chat")}
    n_full = [int(s.sum()) for s in full["plain"].scopes]
    assert n_full == [int(s.sum()) for s in full["chat"].scopes]  # whole records: the same content
    # A cut inside WITH_INPUT's input under both templates; plain's longer header leaves fewer content tokens.
    max_len = int(np.flatnonzero(full["chat"].scopes[0])[-1]) - 3
    with pytest.warns(DataWarning, match=r"truncated \d of 3 .*; 1 of them lost instruction/input tokens"):
        cut = {t: encode_records(recs, tok, template=t, scope="content", max_length=max_len)
               for t in ("plain", "chat")}
    kept = {t: [int(s.sum()) for s in cut[t].scopes] for t in cut}
    assert kept["plain"][0] < kept["chat"][0] < n_full[0]  # without caps the templates differ
    caps = content_caps(recs, [(tok, "plain"), (tok, "chat")], max_length=max_len)
    assert caps == {"a": kept["plain"][0], "b": n_full[1], "s": n_full[2]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        capped = {t: encode_records(recs, tok, template=t, scope="content", max_length=max_len, content_caps=caps)
                  for t in ("plain", "chat")}
    for t in capped:
        assert [int(s.sum()) for s in capped[t].scopes] == [caps[r.id] for r in recs]
        assert capped[t].content_cut.tolist() == [n_full[0] - caps["a"], 0, 0]
    # The cap keeps each template's first content tokens: the same text.
    texts = {t: dec(tok, capped[t].ids[0][capped[t].scopes[0]]) for t in capped}
    assert texts["plain"] == texts["chat"] and WITH_INPUT.instruction in texts["plain"]
    assert capped["plain"].capped.tolist() == [0, 0, 0]
    assert capped["chat"].capped.tolist() == [kept["chat"][0] - kept["plain"][0], 0, 0]
    with pytest.raises(ValueError, match="scope='content' only"):
        encode_records(recs, tok, scope="prompt", content_caps=caps)
    with pytest.raises(ValueError, match=r"no cap >= 0 for 1 record\(s\) \(first: 's'\)"):
        encode_records(recs, tok, scope="content", content_caps={"a": 1, "b": 2})


# --- edges found by mutation testing --------------------------------------------


def _chat_with(tok, user_turn):
    """A copy of `tok` whose chat template renders the user turn as `user_turn` (a Jinja
    expression over m['content'])."""
    t = copy.deepcopy(tok)
    t.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ " + user_turn + " }}"
                       "{% else %}{{ '<|assistant|>\\n' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    return t


def test_content_token_merged_with_template_text_after_it_counts(tok):
    # The template appends "s" to the message: " island" + "s" is one token (" islands"), which
    # overlaps the instruction, so it is content.
    t = _chat_with(tok, "'<|user|>\\n' + m['content'] + 's\\n'")
    e = encode_record(Record("i", "general_qa", "Name the island", output="Crete"), t, template="chat",
                      scope="content")
    assert dec(t, e.ids[e.scope]) == "Name the islands"


def test_trimmed_space_token_at_the_end_of_the_content_counts(tok):
    # Trailing spaces of the instruction: with offsets trimmed, their token has the empty span
    # at its end, which is the end of the instruction; it is content as without trimming.
    rec = Record("t", "code", "Fix this   ", output="Fixed.")
    e, t = (encode_record(rec, k, template="plain", scope="content") for k in (tok, trimming_copy(tok)))
    assert dec(tok, e.ids[e.scope]) == rec.instruction
    np.testing.assert_array_equal(t.scope, e.scope)


def test_templates_that_alter_or_drop_the_message_are_refused_for_content(tok):
    altered = _chat_with(tok, "'<|user|>\\n' + m['content'] | replace('\\n\\n', ' ') + '\\n'")
    dropped = _chat_with(tok, "'<|user|>\\n(the question)\\n'")
    for t in (altered, dropped):
        assert encode_record(WITH_INPUT, t, template="chat", scope="prompt").scope.any()  # prompt scope works
        with pytest.raises(ValueError, match="changes the user message's text"):
            encode_record(WITH_INPUT, t, template="chat", scope="content")


class _Proxy:
    """A tokenizer stand-in: `tok` with attributes overridden and, optionally, other ids on
    the call that asks for character offsets."""

    def __init__(self, tok, shift_offset_ids=False, **attrs):
        self._tok, self._shift, self._attrs = tok, shift_offset_ids, attrs

    def __getattr__(self, name):
        return self._attrs[name] if name in self._attrs else getattr(self._tok, name)

    def __call__(self, text, **kw):
        out = dict(self._tok(text, **kw))
        if self._shift and kw.get("return_offsets_mapping"):
            out["input_ids"] = [i + 1 for i in out["input_ids"]]
        return out


def test_content_scope_needs_a_fast_and_stable_tokenizer(tok):
    with pytest.raises(ValueError, match="needs a fast tokenizer"):
        encode_record(NO_INPUT, _Proxy(tok, is_fast=False), scope="content")
    with pytest.raises(ValueError, match="tokens changed between two tokenizations"):
        encode_record(NO_INPUT, _Proxy(tok, shift_offset_ids=True), scope="content")


def test_tokenizer_without_bos_or_eos(tok):
    # Many tokenizers define no BOS (or no EOS): nothing is added in their place.
    bare = _Proxy(tok, bos_token_id=None, eos_token_id=None)
    prompt, response = format_plain(NO_INPUT)
    e = encode_record(NO_INPUT, bare, template="plain", scope="prompt")
    assert dec(tok, e.ids) == prompt + response
    assert dec(tok, e.ids[e.scope]) == prompt


def test_content_scope_after_a_boundary_merge(tok):
    # The text-split path (see test_chat_template_boundary_merge_falls_back_to_text_split)
    # adds no BOS: content starts at the instruction's first token, " Why" (the template's
    # space merged with the first content word counts as content).
    t = copy.deepcopy(tok)
    t.chat_template = QA_TEMPLATE
    rec = Record("c", "general_qa", "Why is the sky blue?", output="The air scatters blue light most.")
    e = encode_record(rec, t, template="chat", scope="content")
    assert dec(t, e.ids[e.scope]) == " " + rec.instruction


def test_max_length_bounds_and_untruncated_records(tok):
    n = len(encode_record(NO_INPUT, tok))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly max_length tokens: not truncated, no warning
        e = encode_record(NO_INPUT, tok, max_length=n)
        assert not e.truncated and len(e) == n
        assert (e.content_cut, e.capped) == (0, 0)  # only scope="content" leaves content out
    with pytest.warns(DataWarning):
        one = encode_record(NO_INPUT, tok, max_length=1, scope="content")
    assert one.truncated and len(one) == 1 and not one.scope.any()  # BOS only
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        encode_record(NO_INPUT, tok, max_length=0)


def test_encoded_set_length_and_content_cap_of_zero(tok):
    from sparcom_jax.data import content_caps

    s = encode_records([WITH_INPUT, NO_INPUT], tok, scope="content", content_caps={"a": 0, "b": 2})
    assert len(s) == 2
    assert [int(m.sum()) for m in s.scopes] == [0, 2]  # a cap of 0 counts no content token
    with pytest.raises(ValueError, match="at least one"):
        content_caps([NO_INPUT], [], max_length=None)
