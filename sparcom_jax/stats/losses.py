"""Per-category loss on reference responses, with neurons or experts switched off in the forward.

This is the model side of the causal check (METHOD.md, beyond the paper): the
analysis' `ablation_matrix` calls `loss_fn(mask)` with a bool mask (True = off)
and gets back the mean response-token loss of every category.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparcom_jax.next_token import next_token_loss, target_mask
from sparcom_jax.stats.runner import BatchRunner

ABLATION_KINDS = ("neurons", "experts", "expert_neurons")


def _loss_step(graphdef, state, ids_BT, valid_BT, target_BT, ablate=None):
    """Summed next-token loss per sequence over the tokens `target_BT` marks (on the token itself).

    Returns {"loss_sum": float32 [B], "n_targets": float32 [B]} (`next_token_loss`).
    """
    logits_BTV = nnx.merge(graphdef, state).forward(ids_BT, valid_BT, ablate=ablate).logits
    loss_B, n_B = next_token_loss(logits_BTV, ids_BT, target_mask(target_BT, valid_BT))
    return {"loss_sum": loss_B, "n_targets": n_B}


def ablation_arrays(model, mask: np.ndarray | None, kind: str) -> dict | None:
    """Turn a bool mask (True = switched off) into the forward's `ablate` arrays.

    kind "neurons": mask [L, F] over dense-FFN or shared-expert neurons (activation
    forced to 0); "experts": [L, E] experts removed from routing; "expert_neurons":
    [L, E, G] expert neurons forced to 0.
    """
    if mask is None:
        return None
    cfg = model.config
    mask = np.asarray(mask, bool)
    expected = {"neurons": (cfg.num_layers, cfg.neuron_width),
                "experts": (cfg.num_layers, cfg.num_experts),
                "expert_neurons": (cfg.num_layers, cfg.num_experts, cfg.moe_intermediate_size)}
    if kind not in expected:
        raise ValueError(f"ablation kind {kind!r} is not one of {ABLATION_KINDS}")
    if mask.shape != expected[kind]:
        raise ValueError(f"{kind} ablation mask has shape {mask.shape}, this model needs {expected[kind]}")
    if kind == "neurons":
        return {"neuron_keep": jnp.asarray(~mask, jnp.float32)}
    if kind == "experts":
        return {"expert_drop": jnp.asarray(mask)}
    return {"expert_neuron_keep": jnp.asarray(~mask, jnp.float32)}


class CategoryLoss:
    """Mean response-token loss per category, one compiled forward per batch shape.

    Masks enter the jitted step as traced arguments, so evaluating many masks
    (every category, every random draw) reuses the same compilation.

    Args:
      model: a `CausalLM`.
      encoded: an `EncodedSet` made with scope="response" (its scopes mark the targets).
      kind: what masks passed to `__call__` switch off (see `ablation_arrays`).
      batch_size, mesh: as for collection.
      buckets: fixed padded lengths (one compilation each; e.g. the collection's
        `buckets`); None = the data module's default ladder. Padding is masked, so
        the losses do not depend on them.
    """

    def __init__(self, model, encoded, *, kind: str = "neurons", batch_size: int = 8, mesh=None,
                 buckets: Sequence[int] | None = None):
        if kind not in ABLATION_KINDS:
            raise ValueError(f"ablation kind {kind!r} is not one of {ABLATION_KINDS}")
        self.model = model
        self.kind = kind
        self.encoded = encoded
        self.runner = BatchRunner(model, _loss_step, batch_size, mesh=mesh, buckets=buckets)

    def __call__(self, mask: np.ndarray | None = None) -> dict[str, float]:
        ablate = ablation_arrays(self.model, mask, self.kind)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for idx, res in self.runner.run(self.encoded.ids, self.encoded.scopes, extra=ablate):
            for i, s, n in zip(idx, res["loss_sum"], res["n_targets"]):
                c = self.encoded.categories[i]
                sums[c] = sums.get(c, 0.0) + float(s)
                counts[c] = counts.get(c, 0) + int(n)
        return {c: sums[c] / counts[c] for c in sums if counts[c] > 0}


def make_loss_fn(model, records, tokenizer=None, *, kind: str = "neurons", template: str = "plain",
                 batch_size: int = 8, max_length: int | None = 512, mesh=None,
                 buckets: Sequence[int] | None = None) -> Callable[[np.ndarray | None], Mapping[str, float]]:
    """The `loss_fn` for `ablation_matrix`: mask (or None) -> {category: mean response loss}.

    `buckets`: fixed padded lengths (see `CategoryLoss`).
    """
    from sparcom_jax.data import encode_records, resolve_tokenizer

    tok = resolve_tokenizer(model, tokenizer)
    enc = encode_records(records, tok, template=template, scope="response", max_length=max_length)
    return CategoryLoss(model, enc, kind=kind, batch_size=batch_size, mesh=mesh, buckets=buckets)


def category_losses(model, records, tokenizer=None, *, template: str = "plain", ablate_mask=None,
                    kind: str = "neurons", batch_size: int = 8, max_length: int | None = 512,
                    buckets: Sequence[int] | None = None) -> dict[str, float]:
    """Mean response-token loss per category (optionally with a mask switched off)."""
    return make_loss_fn(model, records, tokenizer, kind=kind, template=template, batch_size=batch_size,
                        max_length=max_length, buckets=buckets)(ablate_mask)
