"""collect_instructions / collect_counts on unusable input: nothing in scope, a bad batch size."""

from __future__ import annotations

import numpy as np
import pytest

import sparcom_jax as sj
from sparcom_jax.data import DataWarning, Record, default_tokenizer, encode_record, load_instructions, sample_balanced


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    from sparcom_jax.models.config import ModelConfig

    cfg = ModelConfig.from_hf_config(dict(model_type="llama", vocab_size=len(tok), hidden_size=16,
                                          intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1))
    return sj.init_model(cfg, seed=0)


def test_a_category_with_nothing_in_scope_is_refused_before_the_model_runs(tok):
    records = sample_balanced(load_instructions(), 1, seed=0)
    # model=None: the refusal must come before any forward pass.
    with pytest.raises(ValueError) as e:
        sj.collect_instructions(None, records, tok, scope="response", max_length=8, progress=False)
    msg = str(e.value)
    assert msg.startswith("no record of CLS (classification, 1 record(s)), CODE (code, 1 record(s)), ")
    assert "SUM (summarization, 1 record(s)) has a token in scope='response' with max_length=8" in msg
    assert msg.endswith("raise max_length (data.max_length, now 8) or change the scope (data.scope, now 'response')")
    with pytest.raises(ValueError, match="no records to collect counts for"):
        sj.collect_instructions(None, [], tok, progress=False)


def test_records_with_nothing_in_scope_are_reported_per_category(tok, tiny):
    short_math = Record("m-short", "math", "Add 2 and 3.", output="It is 5.")
    long_math = Record("m-long", "math", "Add these numbers and explain each step: " + "1 + " * 30 + "1.",
                       output="31")
    code = Record("c-short", "code", "Reverse s.", output="s[::-1]")
    # Cut exactly at the long prompt's end: it keeps no response token, the short ones keep theirs.
    cut = encode_record(long_math, tok).prompt_len
    assert encode_record(short_math, tok).prompt_len < cut - 2 and encode_record(code, tok).prompt_len < cut - 2
    with pytest.warns(DataWarning) as caught:
        counts = sj.collect_instructions(tiny, [short_math, long_math, code], tok, scope="response",
                                         max_length=cut, progress=False)
    text = "\n".join(str(w.message) for w in caught)
    assert (f"1 of 3 record(s) have no token in scope='response' with max_length={cut} and count as empty "
            "rows (MATH 1 of 2; first: 'm-long')") in text
    assert counts.meta["n_empty_scope"] == {"code": 0, "math": 1}
    assert np.asarray(counts.tokens).tolist()[1] == 0 and min(np.asarray(counts.tokens)[[0, 2]]) > 0


def test_a_batch_size_that_is_not_an_integer_is_named(tiny):
    seqs = [np.array([3, 4, 5]), np.array([6, 7])]
    for bad in (2.5, "8", True):
        with pytest.raises(TypeError, match=f"batch_size must be a positive integer, got {bad!r}"):
            sj.collect_counts(tiny, seqs, batch_size=bad, progress=False)
    ok = sj.collect_counts(tiny, seqs, batch_size=np.int64(2), progress=False)
    assert np.asarray(ok.tokens).tolist() == [3, 2]


def test_a_tokenizers_padded_output_is_counted_without_its_padding():
    # tokenizer(texts, padding=True) is how a notebook gets token ids (README "Using it from
    # Python"); its padding, on either side, must not count as tokens.
    from sparcom_jax.stats.runner import unpad

    tok = default_tokenizer()  # its own: the padding side is changed below

    texts = ["Sort 3, 1, 2.", "Write a long poem about the sea and the wind tonight."]
    plain = [np.asarray(tok(t)["input_ids"]) for t in texts]
    for side in ("right", "left"):
        tok.padding_side = side
        batch = tok(texts, padding=True, return_tensors="np")
        assert batch["input_ids"].shape[1] == len(plain[1]) > len(plain[0])
        rows = unpad(batch)
        assert [r.tolist() for r in rows] == [p.tolist() for p in plain]
    assert unpad(plain) is plain


def test_one_padded_array_is_refused_with_the_fix_before_the_model_runs(tok):
    from sparcom_jax.models.config import ModelConfig

    cfg = ModelConfig.from_hf_config(dict(model_type="llama", vocab_size=len(tok), hidden_size=16,
                                          intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1))
    model = sj.abstract_model(cfg)  # no weights: the refusal must come before any forward pass
    batch = tok(["Sort 3, 1, 2.", "Write a long poem about the sea."], padding=True, return_tensors="np")
    with pytest.raises(ValueError, match=r"one \[2, \d+\] array; if it is padded, the padding would be counted.*"
                                         r"attention_mask"):
        sj.collect_counts(model, batch["input_ids"], progress=False)
    with pytest.raises(ValueError, match="without an attention_mask"):
        sj.collect_counts(model, {"input_ids": batch["input_ids"]}, progress=False)


def test_sequences_longer_than_the_models_context_are_refused_before_the_model_runs(tok, tiny):
    # A model computes at positions it was never trained on without complaint; these counts and
    # losses went through silently (a 1,202-token record on a model of 128 positions).
    import dataclasses

    short = sj.init_model(dataclasses.replace(tiny.config, max_position_embeddings=12), seed=0)
    fix = "cut the records to max_length=12 or less"
    with pytest.raises(ValueError, match=r"1 of 2 sequences are longer than the model's context "
                                         rf"\(max_position_embeddings=12 in its config; record 'b' has 13 tokens\).*{fix}"):
        sj.collect_counts(short, [np.arange(3, 8), np.arange(3, 16)], ids=["a", "b"], progress=False)
    long_record = Record("q-long", "general_qa", "Why? " * 20, output="Because.")
    with pytest.raises(ValueError, match=f"record 'q-long' has .*{fix}"):
        sj.collect_instructions(short, [long_record], tok, max_length=None, progress=False)
    with pytest.raises(ValueError, match=f"record 'q-long' has .*{fix}"):
        sj.make_loss_fn(short, [long_record], tok, max_length=None)
    with pytest.warns(DataWarning, match="truncated"):  # the fix: cut at the model's context
        counts = sj.collect_instructions(short, [long_record], tok, max_length=12, progress=False)
    assert np.asarray(counts.tokens).tolist()[0] > 0
