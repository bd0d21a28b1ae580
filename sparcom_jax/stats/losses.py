"""Per-category loss on reference responses, with neurons or experts switched off in the forward.

This is the model side of the causal check (METHOD.md, beyond the paper): the
analysis' `ablation_matrix` calls `loss_fn(mask)` with a bool mask (True = off)
and gets back the mean response-token loss of every category.

Removing experts changes routing. By default (``expert_mode="post"``) the removed
experts' probabilities are zeroed after the softmax and the top-k is taken from the
rest, renormalised only as the model itself does (``norm_topk_prob``): tokens that
never used a removed expert are untouched. ``"pre"`` removes them before the softmax,
which with ``norm_topk_prob=False`` (Qwen1.5-MoE, OLMoE) rescales every token's
weights; with ``norm_topk_prob=True`` the two coincide. The routing mass the removed
experts had is reported (`CategoryLoss.last_dropped_mass`): a large effect from a
small mass is specific, a large mass says the routing itself was disrupted.
"""

from __future__ import annotations

import collections
from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparcom_jax.next_token import next_token_loss, target_mask
from sparcom_jax.stats.runner import BatchRunner, position_error

ABLATION_KINDS = ("neurons", "experts", "expert_neurons")
EXPERT_MODES = ("post", "pre")


def _loss_step(graphdef, state, ids_BT, valid_BT, target_BT, ablate=None):
    """Summed next-token loss per sequence over the tokens `target_BT` marks (on the token itself).

    Returns {"loss_sum": float32 [B], "n_targets": float32 [B]} (`next_token_loss`) and,
    with an "expert_drop" mask (all False for a baseline), "expert_mass_sum" float32
    [B, L, E]: each expert's softmax probability in this pass, summed over the scored
    prediction positions (the removed experts' part is the routing mass dropped).
    """
    out = nnx.merge(graphdef, state).forward(ids_BT, valid_BT, ablate=ablate)
    targets_BT = target_mask(target_BT, valid_BT)
    loss_B, n_B = next_token_loss(out.logits, ids_BT, targets_BT)
    res = {"loss_sum": loss_B, "n_targets": n_B}
    if out.stats is not None and "router_probs" in out.stats:
        # A masked sum, not a product: a matmul would run in TF32 / bfloat16 passes on accelerators.
        res["expert_mass_sum"] = jnp.sum(jnp.where(targets_BT[:, None, :, None], out.stats["router_probs"], 0.0),
                                         axis=2)
    return res


def _check_modes(kind: str, expert_mode: str) -> None:
    if kind not in ABLATION_KINDS:
        raise ValueError(f"ablation kind {kind!r} is not one of {ABLATION_KINDS}")
    if expert_mode not in EXPERT_MODES:
        raise ValueError(f"expert_mode {expert_mode!r} is not one of {EXPERT_MODES}")


def ablation_arrays(model, mask: np.ndarray | None, kind: str, expert_mode: str = "post") -> dict | None:
    """Turn a bool mask (True = switched off) into the forward's `ablate` arrays.

    kind "neurons": mask [L, F] over dense-FFN or shared-expert neurons (activation
    forced to 0); "experts": [L, E] experts removed from routing, after the softmax
    (`expert_mode` "post", default) or before it ("pre"; see the module docstring);
    "expert_neurons": [L, E, G] expert neurons forced to 0.
    """
    if mask is None:
        return None
    _check_modes(kind, expert_mode)
    cfg = model.config
    mask = np.asarray(mask, bool)
    expected = {"neurons": (cfg.num_layers, cfg.neuron_width),
                "experts": (cfg.num_layers, cfg.num_experts),
                "expert_neurons": (cfg.num_layers, cfg.num_experts, cfg.moe_intermediate_size)}
    if mask.shape != expected[kind]:
        raise ValueError(f"{kind} ablation mask has shape {mask.shape}, this model needs {expected[kind]}")
    if kind == "neurons":
        return {"neuron_keep": jnp.asarray(~mask, jnp.float32)}
    if kind == "experts":
        return {"expert_drop": jnp.asarray(mask),
                "expert_drop_pre": jnp.full((cfg.num_layers,), expert_mode == "pre")}
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
      expert_mode: how experts are removed, "post" (default) or "pre" softmax.

    Attributes:
      last_dropped_mass: after a call that removed experts, the softmax mass the
        removed experts had, averaged over every target token (of all categories) and
        the layers; None after any other call (read by `ablation_matrix`).
      last_category_mass: after a call that removed experts, {category: the same mass
        over that category's target tokens only}; None after any other call.
      last_expert_mass: after any call of kind "experts" (the baseline included),
        {category: float [L, E] each expert's softmax probability in that pass, averaged
        over the category's target tokens and divided by L}, so that a mask's entries
        sum to the mass it drops (or would drop, from the baseline's); None otherwise.
      coverage: {category: {"records": its records in `encoded`, "scored_records":
        those that keep a response token within the cut, "response_tokens": the
        tokens its loss averages over}} (read by `ablation_matrix`, which flags
        categories whose loss rests on few records).
    """

    def __init__(self, model, encoded, *, kind: str = "neurons", batch_size: int = 8, mesh=None,
                 buckets: Sequence[int] | None = None, expert_mode: str = "post"):
        _check_modes(kind, expert_mode)
        too_long = position_error(model.config, [len(x) for x in encoded.ids], getattr(encoded, "record_ids", None))
        if too_long is not None:
            raise too_long
        self.model = model
        self.kind = kind
        self.expert_mode = expert_mode
        self.encoded = encoded
        self.runner = BatchRunner(model, _loss_step, batch_size, mesh=mesh, buckets=buckets)
        self.last_dropped_mass: float | None = None
        self.last_category_mass: dict[str, float] | None = None
        self.last_expert_mass: dict[str, np.ndarray] | None = None
        self.coverage = response_coverage(encoded)

    def __call__(self, mask: np.ndarray | None = None) -> dict[str, float]:
        cfg = self.model.config
        # A baseline of experts removes none: the same program as the ablated passes (one
        # compilation), bit for bit the unablated forward, and it measures each expert's mass.
        none = self.kind == "experts" and mask is None
        ablate = ablation_arrays(self.model, np.zeros((cfg.num_layers, cfg.num_experts), bool) if none else mask,
                                 self.kind, self.expert_mode)
        sums: dict[str, float] = collections.defaultdict(float)
        counts: dict[str, int] = collections.defaultdict(int)
        mass: dict[str, np.ndarray] = {}
        for idx, res in self.runner.run(self.encoded.ids, self.encoded.scopes, extra=ablate):
            for j, (i, s, n) in enumerate(zip(idx, res["loss_sum"], res["n_targets"])):
                cat = self.encoded.categories[i]
                sums[cat] += float(s)
                counts[cat] += int(n)
                if "expert_mass_sum" in res:
                    mass[cat] = mass.get(cat, 0.0) + np.asarray(res["expert_mass_sum"][j], np.float64)
        L = cfg.num_layers
        # Per token and layer, so that a mask's mass is the sum of its experts' entries.
        self.last_expert_mass = {c: m / (counts[c] * L) for c, m in mass.items() if counts[c]} or None
        dropped = self.kind == "experts" and mask is not None and self.last_expert_mass is not None
        drop = np.asarray(mask, bool) if dropped else None
        self.last_category_mass = ({c: float(m[drop].sum()) for c, m in self.last_expert_mass.items()}
                                   if dropped else None)
        n_targets = sum(counts.values())
        self.last_dropped_mass = (sum(float(m[drop].sum()) for m in mass.values()) / (n_targets * L)
                                  if dropped and n_targets else None)
        return {c: sums[c] / counts[c] for c in sums if counts[c] > 0}


def response_targets(encoded) -> np.ndarray:
    """int [N]: the loss targets of each record of an `EncodedSet` (0: its response was cut away)."""
    # The first token is never predicted: a target is a scope token at t >= 1 (`target_mask`).
    return np.array([int(np.sum(np.asarray(scope_T, bool)[1:])) for scope_T in encoded.scopes], np.int64)


def response_coverage(encoded) -> dict[str, dict[str, int]]:
    """{category: {"records", "scored_records", "response_tokens"}} of an `EncodedSet`: its
    records, those keeping a response token within the cut, and the tokens its loss averages."""
    coverage: dict[str, dict[str, int]] = {}
    for cat, n in zip(encoded.categories, response_targets(encoded).tolist()):
        cov = coverage.setdefault(cat, {"records": 0, "scored_records": 0, "response_tokens": 0})
        cov["records"] += 1
        cov["scored_records"] += n > 0
        cov["response_tokens"] += n
    return coverage


def encode_held_out(records, tokenizer, *, template: str = "plain", max_length: int | None = 512):
    """The sequences the causal check measures its loss on: each record's prompt and reference
    response, the response tokens in scope (the targets). What `make_loss_fn` scores, and what
    the pipeline fingerprints a stored causal check by.

    Returns:
      An `EncodedSet` with scope "response" (`records` as in `make_loss_fn`).
    """
    from sparcom_jax.data import as_records, encode_records

    return encode_records(as_records(records, "make_loss_fn"), tokenizer, template=template, scope="response",
                          max_length=max_length)


def make_loss_fn(model, records, tokenizer=None, *, kind: str = "neurons", template: str = "plain",
                 batch_size: int = 8, max_length: int | None = 512, mesh=None,
                 buckets: Sequence[int] | None = None, expert_mode: str = "post",
                 encoded=None) -> Callable[[np.ndarray | None], Mapping[str, float]]:
    """The `loss_fn` for `ablation_matrix`: mask (or None) -> {category: mean response loss}.

    `records`: as in `collect_instructions` (Records, a file, dicts, a DataFrame);
    `buckets`: fixed padded lengths; `expert_mode`: see `CategoryLoss`; `encoded`: the
    `EncodedSet` `encode_held_out` made of `records` (the pipeline fingerprints it), scored
    as it is (`records`, `tokenizer` and `template` are then not read; `max_length` only
    names the cut in the error below: pass the one `encoded` was made with). The returned
    `CategoryLoss` also reports ``last_dropped_mass``.

    Raises:
      ValueError: a category of `records` has no response token within `max_length` (its
        prompts fill it), so its losses would be missing from every pass; or no record of a
        category has a reference response (`check_responses`, made unless `encoded` is given:
        the pipeline checks the records before any work).
    """
    from sparcom_jax.categories import CATEGORIES, SHORT_NAMES
    from sparcom_jax.data import as_records, resolve_tokenizer
    from sparcom_jax.data.records import check_responses

    if encoded is None:
        records = as_records(records, "make_loss_fn")
        check_responses(records)
    enc = encoded if encoded is not None else encode_held_out(
        records, resolve_tokenizer(model, tokenizer), template=template, max_length=max_length)
    coverage = response_coverage(enc)
    unscored = [c for c in CATEGORIES if c in coverage and not coverage[c]["scored_records"]]
    if unscored:
        raise ValueError(
            f"no held-out record of {', '.join(f'{SHORT_NAMES[c]} ({c})' for c in unscored)} keeps a response token "
            f"within max_length={max_length}: the prompts fill it, so the causal check would score nothing there; "
            "raise max_length (data.max_length)")
    return CategoryLoss(model, enc, kind=kind, batch_size=batch_size, mesh=mesh, buckets=buckets,
                        expert_mode=expert_mode)
