"""Fine-tuning scores the response, shifted by one: the first step against a plain numpy cross-entropy.

The reference is computed from the records alone: the response tokens (checked to
decode to the record's output), the model's logits of each unpadded sequence, and a
float64 log-softmax. It fails if the training encode scored the prompt or all tokens,
or if the targets or the logits were shifted by one position too many or too few.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from test_train_loop import MODEL, _random_model

ROWS = 6


def test_first_step_scores_exactly_the_shifted_response_tokens(tmp_path, monkeypatch):
    import sparcom_jax.train.loop as loop
    from sparcom_jax.data import default_tokenizer, encode_records, load_instructions
    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.train import TrainConfig, finetune

    tok = default_tokenizer()
    # The shortest record of each category: whole prompts and responses fit max_length.
    size = lambda r: len(r.instruction + r.input + r.output)  # noqa: E731
    shortest = {}
    for r in load_instructions():
        if r.category not in shortest or size(r) < size(shortest[r.category]):
            shortest[r.category] = r
    records = list(shortest.values())
    assert len(records) == ROWS
    model = _random_model(ModelConfig.from_hf_config({**MODEL, "vocab_size": len(tok),
                                                      "pad_token_id": tok.pad_token_id}), seed=1)

    built = []  # the loop's batches, to read the first step's targets

    class Recorded(loop.TrainBatches):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    monkeypatch.setattr(loop, "TrainBatches", Recorded)
    cfg = TrainConfig(batch_size=ROWS, grad_accum=2, max_length=128, buckets=(128,), total_steps=2, warmup_steps=1,
                      save_every=100, seed=0)
    rows = {}

    def stop_after_first(step, row):
        rows[step] = row
        return step == 1

    res = finetune(model, records, tok, cfg, tmp_path / "run", eval_records=records[:1], progress=False,
                   callback=stop_after_first)
    assert sorted(res.losses) == [1] and len(built) == 1

    # The reference: response tokens of each record and the numpy loss on them.
    ref = encode_records(records, tok, scope="response", max_length=128)
    want_sum, want_n, want_rows = 0.0, 0, {}
    for r, ids, resp in zip(records, ref.ids, ref.scopes):
        text = tok.decode(ids[resp])
        assert text and (r.output + tok.eos_token).startswith(text), (r.id, text)
        assert not resp[0] and resp[-1]  # a non-empty response after a non-empty prompt
        logits = np.asarray(model(jnp.asarray(ids[None])), np.float64)[0]
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        for t in range(len(ids) - 1):
            if resp[t + 1]:  # the logits at t predict token t+1
                want_sum -= logp[t, ids[t + 1]]
                want_n += 1
        want_rows[ids.tobytes()] = np.concatenate([resp[1:], [False]])

    # Step 1's batch holds every record once; its targets are the shifted response masks.
    batch = built[0].batch(0)
    ids_BT = batch.ids_ABT.reshape(ROWS, -1)
    tgt_BT = batch.targets_ABT.reshape(ROWS, -1)
    real_BT = batch.mask_ABT.reshape(ROWS, -1)
    seen = set()
    for ids_T, tgt_T, real_T in zip(ids_BT, tgt_BT, real_BT):
        key = ids_T[real_T].tobytes()
        assert key in want_rows and key not in seen
        seen.add(key)
        want = np.zeros_like(tgt_T)
        want[:real_T.sum()] = want_rows[key]
        np.testing.assert_array_equal(tgt_T, want)
    assert len(seen) == ROWS and batch.n_targets == want_n == rows[1]["target_tokens"]
    # The step's reported loss (computed on the initial parameters) is the per-token mean.
    np.testing.assert_allclose(res.losses[1], want_sum / want_n, rtol=2e-5)
