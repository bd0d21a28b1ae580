"""Fine-tuning steps against PyTorch: the same tiny Qwen2 checkpoint trained by torch's AdamW.

The reference is written the way a PyTorch SFT script writes it, from nothing in
sparcom_jax: transformers' model and its cosine-with-minimum schedule with warm-up,
torch.optim.AdamW with two parameter groups (no weight decay on biases and norm
scales: the usual Trainer grouping), clip_grad_norm_, and a cross-entropy over the
response tokens of the whole batch divided by their count. Qwen2 has attention biases
and a tied embedding, so both decay groups and the shared matrix are exercised. After
every step the weights must agree; each of these changes makes the test fail: decay on
biases and norms (or none on the matrices), warm-up or decay one step off, the prompt or
the padding scored, a per-micro-batch mean, clipping after the optimizer.
"""

from __future__ import annotations

import numpy as np

STEPS, WARMUP = 4, 2
HP = dict(learning_rate=1e-2, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, end_lr_fraction=0.1)


def _batch():
    """ids, real tokens and response tokens [4, 12]: prompts of 2 to 9 tokens, one row padded."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, (4, 12)).astype(np.int32)
    valid = np.ones((4, 12), bool)
    valid[1, 8:] = False
    ids[~valid] = 0
    response = np.zeros((4, 12), bool)
    for row, start in enumerate((9, 4, 2, 6)):
        response[row, start:] = True
    return ids, valid, response & valid


def _torch_steps(path, ids, valid, response):
    """HF names -> float32 weights after each of STEPS torch AdamW steps."""
    import torch
    from transformers import AutoModelForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.train()
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if n.endswith("bias") or "norm" in n]
    decay = [p for n, p in named if not (n.endswith("bias") or "norm" in n)]
    assert no_decay and decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HP["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=HP["learning_rate"], betas=(HP["b1"], HP["b2"]), eps=HP["eps"])
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, WARMUP, STEPS, min_lr_rate=HP["end_lr_fraction"])
    x, am = torch.tensor(ids, dtype=torch.long), torch.tensor(valid.astype(np.int64))
    labels = x[:, 1:]
    scored = torch.tensor(response[:, 1:])  # logits at t predict token t+1
    out, lrs = [], []
    for _ in range(STEPS):
        logits = model(input_ids=x, attention_mask=am).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                reduction="none").reshape(labels.shape)
        loss = nll[scored].sum() / scored.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HP["clip_norm"])
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        out.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    return out, lrs


def test_adamw_steps_match_torch_adamw_with_the_same_schedule_mask_and_loss(hf_checkpoint):
    import jax

    import sparcom_jax as sj
    from sparcom_jax.checkpoints.hf import hf_state_dict
    from sparcom_jax.next_token import target_mask
    from sparcom_jax.parallel.mesh import make_mesh
    from sparcom_jax.train import TrainConfig, make_optimizer
    from sparcom_jax.train.step import (compute_graphdef, init_state, make_shardings, make_train_step, merge_params,
                                        pure_params)

    path = hf_checkpoint("qwen2_tied")
    ids, valid, response = _batch()
    want, want_lr = _torch_steps(path, ids, valid, response)

    model = sj.load_model(path)
    cfg = TrainConfig(optimizer="adamw", warmup_steps=WARMUP, total_steps=STEPS, batch_size=4, grad_accum=2, **HP)
    tx, sched = make_optimizer(cfg, STEPS)
    sh = make_shardings(model.config, tx, make_mesh(1, 1))
    graphdef = compute_graphdef(model.config, "float32")
    step = make_train_step(graphdef, tx, sh, sched)
    state = init_state(pure_params(model), tx, sh)
    # Two micro-batches of 2 rows with 7 and 16 targets: a mean per micro-batch weighs them otherwise.
    targets = target_mask(response, valid)
    assert [int(targets[:2].sum()), int(targets[2:].sum())] == [7, 16]
    batch = [a.reshape(2, 2, 12) for a in (ids, valid, targets)]
    start = hf_state_dict(model)
    clipped = 0
    for s in range(STEPS):
        state, m = step(state, *batch)
        np.testing.assert_allclose(float(m["lr"]), want_lr[s], rtol=1e-6, atol=1e-12, err_msg=f"lr of step {s + 1}")
        clipped += float(m["grad_norm"]) > HP["clip_norm"]
        got = hf_state_dict(merge_params(graphdef, jax.device_get(state.params)))
        assert set(got) <= set(want[s])
        for k, v in got.items():
            # Adam moves a weight by up to ~lr per step (the two agree to 2e-6): 1e-5 is far below what any of the
            # changes in the module docstring make (decay alone moves a norm scale by lr * wd = 1e-3).
            np.testing.assert_allclose(v, want[s][k], atol=1e-5, rtol=0, err_msg=f"step {s + 1}: {k}")
    assert want_lr[0] == 0.0 and clipped >= 1  # warm-up starts at 0; clipping was exercised
    moved = [k for k, v in got.items() if np.abs(v - start[k]).max() > 1e-3]
    assert any("bias" in k for k in moved) and any("norm" in k for k in moved) and "model.embed_tokens.weight" in moved
