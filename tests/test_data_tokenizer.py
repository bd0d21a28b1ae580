"""The shipped BPE tokenizer: HF format, special tokens, round trips, reproducible build."""

from __future__ import annotations

import filecmp
import json

import pytest

from sparcom_jax.data import TOKENIZER_DIR, default_tokenizer, load_instructions
from sparcom_jax.data.tokenizer import SPECIAL_TOKENS, build_default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def test_loads_with_autotokenizer_offline():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    assert 2048 <= len(t) <= 4096
    assert (t.pad_token, t.bos_token, t.eos_token) == ("<pad>", "<s>", "</s>")
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2)
    assert [t.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert t.chat_template and "add_generation_prompt" in t.chat_template
    cfg = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("text", [
    "Summarize the following paragraph in two sentences.",
    "def f(x):\n    return x ** 2  # tabs\tand  spaces",
    "Ünïcödé, 数学 and emoji 🙂 survive byte-level BPE.",
])
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    with_bos = tok(text)["input_ids"]
    assert with_bos == [tok.bos_token_id] + ids  # BOS prepended, no EOS


def test_compresses_the_shipped_text(tok):
    recs = load_instructions()[:60]
    text = "\n".join(r.instruction + "\n" + r.output for r in recs)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n < len(text.encode("utf-8")) / 3  # far fewer tokens than bytes
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_renders_turns(tok):
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<s><|user|>\nHi?\n<|assistant|>\nHello.</s>"
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == \
        "<s><|user|>\nHi?\n<|assistant|>\n"


def test_build_is_reproducible(tmp_path):
    build_default_tokenizer(load_instructions(), tmp_path)
    _, mismatch, errors = filecmp.cmpfiles(
        tmp_path, TOKENIZER_DIR, ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"],
        shallow=False)
    assert mismatch == [] and errors == [], "rerun scripts/build_tokenizer.py"
