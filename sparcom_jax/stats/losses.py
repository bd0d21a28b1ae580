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
import warnings
from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparcom_jax.next_token import next_token_loss, target_mask
from sparcom_jax.stats.counts import Counts
from sparcom_jax.stats.runner import BatchRunner, position_error

ABLATION_KINDS = ("neurons", "experts", "expert_neurons")
EXPERT_MODES = ("post", "pre")


# The scope codes a loss pass takes per token (`BatchRunner(coded_scopes=True)`): bit 0 marks
# the tokens scored (the response), bit 1 the tokens whose firing the baseline pass counts.
SCORED, FIRING = 1, 2
# Ablation kind -> the forward's per-sequence count of that kind's units (`neuron_stats`, MoE stats).
FIRING_FIELDS = {"neurons": "neuron_active", "expert_neurons": "expert_neuron_active"}
# Ablation kind -> the float32 sum of those units' activation A over the same counted tokens where
# A > 0 (the forward's `sums`): the activation magnitude their firing carries (`last_unit_magnitude`).
MAGNITUDE_FIELDS = {k: Counts.SUM_FIELDS[v] for k, v in FIRING_FIELDS.items()}


def _loss_step(graphdef, state, ids_BT, valid_BT, code_BT, extra):
    """Summed next-token loss per sequence over the tokens the codes mark SCORED (on the token itself).

    `extra`: {"ablate": the forward's ablation arrays or None, and optionally "count": a traced
    bool, True in a baseline pass that counts the units' firing}.

    Returns {"loss_sum": float32 [B], "n_targets": float32 [B]} (`next_token_loss`); with an
    "expert_drop" mask (all False for a baseline), "expert_mass_sum" float32 [B, L, E]: each
    expert's softmax probability in this pass, summed over the scored prediction positions (the
    removed experts' part is the routing mass dropped); with "count", "fired_tokens" int32 [B]
    (the real tokens the codes mark FIRING, none unless "count" is True), the counts of
    `FIRING_FIELDS` the model has on them (int32 [B, L, F], [B, L, E, G]) and the float32 sums of
    `MAGNITUDE_FIELDS` beside them (A over the same tokens where A > 0). One program either
    way: "count" is traced, so the ablated passes run the same compilation as the baseline
    (their counts and sums, all 0, are never fetched; `CategoryLoss`).
    """
    count = extra.get("count")
    count_BT = None if count is None else ((code_BT & FIRING) > 0) & valid_BT & count
    out = nnx.merge(graphdef, state).forward(ids_BT, valid_BT, ablate=extra["ablate"], count_mask=count_BT,
                                             sums=count_BT is not None)
    targets_BT = target_mask((code_BT & SCORED) > 0, valid_BT)
    loss_B, n_B = next_token_loss(out.logits, ids_BT, targets_BT)
    res = {"loss_sum": loss_B, "n_targets": n_B}
    if out.stats is not None and "router_probs" in out.stats:
        # A masked sum, not a product: a matmul would run in TF32 / bfloat16 passes on accelerators.
        res["expert_mass_sum"] = jnp.sum(jnp.where(targets_BT[:, None, :, None], out.stats["router_probs"], 0.0),
                                         axis=2)
    if count_BT is not None:
        res["fired_tokens"] = count_BT.sum(-1, dtype=jnp.int32)
        res.update({k: out.stats[k] for k in (*FIRING_FIELDS.values(), *MAGNITUDE_FIELDS.values())
                    if k in out.stats})
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
    expected = ablation_shape(cfg, kind)
    if mask.shape != expected:
        raise ValueError(f"{kind} ablation mask has shape {mask.shape}, this model needs {expected}")
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
      firing_scopes: kinds "neurons" and "expert_neurons": one bool mask per sequence of
        `encoded` (its shape), the tokens whose firing the baseline pass counts (e.g. the
        prompt tokens, when the sets were identified on prompts: `held_out_firing_scopes`);
        None: no firing is counted (`last_unit_firing` stays None).

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
      last_unit_firing: after a baseline call (mask None) with `firing_scopes`, {category:
        float64 [L, F] (neurons) or [L, E, G] (expert neurons): each unit's firing frequency on
        the category's records, the tokens of `firing_scopes` (its active tokens over the
        record's tokens there, as the identification counts define it; an expert neuron
        active on a token routed to its expert), averaged over the category's records (a
        record with none of those tokens counts 0, as in `Identification.category_mean`)};
        None after any other call. Counted in the unablated pass: the activation of a unit
        before any mask.
      last_unit_magnitude: after the same baseline call, {category: float64, the same shape: each
        unit's activation magnitude on the category's records, the sum of its A over the tokens
        of `firing_scopes` where A > 0 (the tokens `last_unit_firing` counts; summed in float32
        in-graph) over the record's tokens there, averaged over the category's records like the
        firing}: the mean positive activation per token, so that a set's sum is the activation
        its firing carries (`ablation_matrix(firing_magnitude=)`); None after any other call.
      firing_records: with `firing_scopes`, {category: its records with a token in `firing_scopes`}
        (those `last_unit_firing` rests on; the others count 0 in its mean), known from the scopes
        alone, so every process has it without a pass; None without `firing_scopes`.
      coverage: {category: {"records": its records in `encoded`, "scored_records":
        those that keep a response token within the cut, "response_tokens": the
        tokens its loss averages over}} (read by `ablation_matrix`, which flags
        categories whose loss rests on few records).
    """

    def __init__(self, model, encoded, *, kind: str = "neurons", batch_size: int = 8, mesh=None,
                 buckets: Sequence[int] | None = None, expert_mode: str = "post",
                 firing_scopes: Sequence[np.ndarray] | None = None):
        _check_modes(kind, expert_mode)
        too_long = position_error(model.config, [len(x) for x in encoded.ids], getattr(encoded, "record_ids", None))
        if too_long is not None:
            raise too_long
        self.model = model
        self.kind = kind
        self.expert_mode = expert_mode
        self.encoded = encoded
        self.runner = BatchRunner(model, _loss_step, batch_size, mesh=mesh, buckets=buckets, coded_scopes=True)
        self.counts_firing = firing_scopes is not None
        self.codes = scope_codes(encoded, firing_scopes, kind)
        self.last_unit_firing: dict[str, np.ndarray] | None = None
        self.last_unit_magnitude: dict[str, np.ndarray] | None = None
        self.firing_records = None if firing_scopes is None else firing_record_counts(encoded.categories, self.codes)
        self.last_dropped_mass: float | None = None
        self.last_category_mass: dict[str, float] | None = None
        self.last_expert_mass: dict[str, np.ndarray] | None = None
        self.coverage = response_coverage(encoded)

    def __call__(self, mask: np.ndarray | None = None) -> dict[str, float]:
        cfg = self.model.config
        # A baseline removes nothing: the same program as the ablated passes (one compilation),
        # bit for bit the unablated forward (experts: none dropped; neurons: every one kept, x 1),
        # and it measures each expert's mass (experts) or each unit's firing (neuron kinds).
        baseline = mask is None
        shape = ablation_shape(cfg, self.kind)
        ablate = ablation_arrays(self.model, np.zeros(shape, bool) if baseline else mask, self.kind,
                                 self.expert_mode)
        extra = {"ablate": ablate}
        fetch = {"loss_sum", "n_targets", "expert_mass_sum"}
        if self.counts_firing:
            extra["count"] = jnp.asarray(baseline)
            if baseline:
                fetch |= {"fired_tokens", FIRING_FIELDS[self.kind], MAGNITUDE_FIELDS[self.kind]}
        sums: dict[str, float] = collections.defaultdict(float)
        counts: dict[str, int] = collections.defaultdict(int)
        mass: dict[str, np.ndarray] = {}
        firing = (_FiringSums((FIRING_FIELDS[self.kind], MAGNITUDE_FIELDS[self.kind]))
                  if self.counts_firing and baseline else None)
        for idx, res in self.runner.run(self.encoded.ids, self.codes, extra=extra, fetch=fetch):
            for j, (i, s, n) in enumerate(zip(idx, res["loss_sum"], res["n_targets"])):
                cat = self.encoded.categories[i]
                sums[cat] += float(s)
                counts[cat] += int(n)
                if "expert_mass_sum" in res:
                    mass[cat] = mass.get(cat, 0.0) + np.asarray(res["expert_mass_sum"][j], np.float64)
                if firing is not None:
                    firing.add(cat, res, j)
        L = cfg.num_layers
        self.last_unit_firing, self.last_unit_magnitude = (None, None) if firing is None else firing.means()
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


class _FiringSums:
    """Per category, the sum over its records of each of `fields`' per-token means (the field of
    the record over its counted tokens: firing frequency, mean positive activation; 0 for a record
    with none) and the record count."""

    def __init__(self, fields: tuple[str, ...]):
        self.fields = fields
        self.total: dict[str, list] = {}
        self.records: dict[str, int] = collections.Counter()

    def add(self, cat: str, res: dict, j: int) -> None:
        t = max(int(res["fired_tokens"][j]), 1)  # (all 0 when no token is counted)
        per_token = [np.asarray(res[f][j], np.float64) / t for f in self.fields]
        self.total[cat] = [a + b for a, b in zip(self.total.get(cat, [0.0] * len(self.fields)), per_token)]
        self.records[cat] += 1

    def means(self) -> tuple[dict[str, np.ndarray], ...]:
        """One {category: mean over its records} per field, in `fields` order."""
        return tuple({c: v[i] / self.records[c] for c, v in self.total.items()} for i in range(len(self.fields)))


def firing_record_counts(categories: Sequence[str], codes: Sequence[np.ndarray]) -> dict[str, int]:
    """{category: its sequences with a token coded FIRING} (`scope_codes`): the records the
    baseline pass counts firing on, the rest counting 0 in the category's mean firing."""
    counts: dict[str, int] = collections.Counter()
    for cat, code in zip(categories, codes, strict=True):
        counts[cat] += bool((np.asarray(code) & FIRING).any())
    return dict(counts)


def ablation_shape(cfg, kind: str) -> tuple[int, ...]:
    """The shape of a `kind` mask on a model of config `cfg`."""
    return {"neurons": (cfg.num_layers, cfg.neuron_width),
            "experts": (cfg.num_layers, cfg.num_experts),
            "expert_neurons": (cfg.num_layers, cfg.num_experts, cfg.moe_intermediate_size)}[kind]


def scope_codes(encoded, firing_scopes: Sequence[np.ndarray] | None, kind: str) -> list[np.ndarray]:
    """int8 [T] per sequence of `encoded`: SCORED on its scope (the response), FIRING on `firing_scopes`.

    Raises:
      ValueError: `firing_scopes` for experts (they have routing mass, not firing), or masks
        that do not fit the sequences (naming the first).
    """
    codes = [np.asarray(sc, bool).astype(np.int8) * SCORED for sc in encoded.scopes]
    if firing_scopes is None:
        return codes
    if kind not in FIRING_FIELDS:
        raise ValueError(f"firing_scopes count neurons' firing; kind {kind!r} has none (experts: last_expert_mass)")
    if len(firing_scopes) != len(codes):
        raise ValueError(f"firing_scopes has {len(firing_scopes)} masks for {len(codes)} sequences")
    for i, (c, f) in enumerate(zip(codes, firing_scopes)):
        if np.shape(f) != c.shape:
            raise ValueError(f"firing_scopes[{i}] has shape {np.shape(f)}, its sequence {c.shape}")
        c |= np.asarray(f, bool).astype(np.int8) * FIRING
    return codes


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


def held_out_firing_scopes(encoded, scope: str, records=None, tokenizer=None, *, template: str = "plain",
                           max_length: int | None = 512) -> list[np.ndarray]:
    """bool [T] per sequence of `encoded` (an `encode_held_out` set): its tokens in `scope`, the
    token scope the sets were identified on ("prompt", "content", "response" or "all";
    METHOD.md, "Token scope"), where the baseline pass counts the units' firing.

    "content" tokenizes the records again (`records`, `tokenizer`, `template`, `max_length`:
    those `encoded` was made with), the other scopes are read off `encoded.prompt_lens`.

    Raises:
      ValueError: an unknown scope, or "content" whose sequences differ from `encoded`'s.
    """
    from sparcom_jax.data import SCOPES, DataWarning, as_records, encode_records

    if scope not in SCOPES:
        raise ValueError(f"firing scope {scope!r} is not one of {SCOPES}")
    if scope == "content":
        with warnings.catch_warnings():  # (a cut record was reported when `encoded` was made)
            warnings.simplefilter("ignore", DataWarning)
            content = encode_records(as_records(records, "make_loss_fn"), tokenizer, template=template,
                                     scope="content", max_length=max_length)
        if any(not np.array_equal(a, b) for a, b in zip(content.ids, encoded.ids, strict=True)):
            raise ValueError("the held-out records' content tokens come from other sequences than the scored ones: "
                             "encode both with the same records, tokenizer, template and max_length")
        return list(content.scopes)
    pos = [np.arange(len(ids)) for ids in encoded.ids]
    if scope == "all":
        return [np.ones(len(p), bool) for p in pos]
    return [(p < n) if scope == "prompt" else (p >= n) for p, n in zip(pos, encoded.prompt_lens)]


def make_loss_fn(model, records, tokenizer=None, *, kind: str = "neurons", template: str = "plain",
                 batch_size: int = 8, max_length: int | None = 512, mesh=None,
                 buckets: Sequence[int] | None = None, expert_mode: str = "post",
                 encoded=None, firing_scope: str | None = "prompt"
                 ) -> Callable[[np.ndarray | None], Mapping[str, float]]:
    """The `loss_fn` for `ablation_matrix`: mask (or None) -> {category: mean response loss}.

    `records`: as in `collect_instructions` (Records, a file, dicts, a DataFrame);
    `buckets`: fixed padded lengths; `expert_mode`: see `CategoryLoss`; `encoded`: the
    `EncodedSet` `encode_held_out` made of `records` (the pipeline fingerprints it), scored
    as it is (`records`, `tokenizer` and `template` are then not read, but for
    `firing_scope` "content"; `max_length` only names the cut in the error below: pass the
    one `encoded` was made with); `firing_scope`: neurons and expert neurons, the token scope
    whose firing the baseline pass counts on the held-out records (`last_unit_firing`, the
    firing-mass-matched control's mass): the scope the sets were identified on (default
    "prompt", `collect_instructions`' default); None counts none. The returned
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
    tok = None if encoded is not None and firing_scope != "content" else resolve_tokenizer(model, tokenizer)
    enc = encoded if encoded is not None else encode_held_out(records, tok, template=template, max_length=max_length)
    coverage = response_coverage(enc)
    unscored = [c for c in CATEGORIES if c in coverage and not coverage[c]["scored_records"]]
    if unscored:
        raise ValueError(
            f"no held-out record of {', '.join(f'{SHORT_NAMES[c]} ({c})' for c in unscored)} keeps a response token "
            f"within max_length={max_length}: the prompts fill it, so the causal check would score nothing there; "
            "raise max_length (data.max_length)")
    firing = (None if firing_scope is None or kind not in FIRING_FIELDS else
              held_out_firing_scopes(enc, firing_scope, records, tok, template=template, max_length=max_length))
    return CategoryLoss(model, enc, kind=kind, batch_size=batch_size, mesh=mesh, buckets=buckets,
                        expert_mode=expert_mode, firing_scopes=firing)
