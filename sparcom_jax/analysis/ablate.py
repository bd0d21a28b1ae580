"""Causal check: switch off a category's ISNs (ISEs, expert neurons) and measure every category's loss.

Axis letters: see `sparcom_jax.axes`.

The model execution lives elsewhere; this module orchestrates it through a
callback ``loss_fn(mask) -> {category: mean loss on its reference responses}``
where `mask` is bool [L, F] (neurons: True = activation forced to 0), [L, E]
(experts: True = removed from routing, as the model side implements it) or
[L, E, G] (expert neurons), and None means no ablation (the baseline). After
each call the callback may expose the routing mass the mask dropped as a float
attribute ``loss_fn.last_dropped_mass``; it is recorded when present.

Random controls: for each category set and draw, a random set with the same
number of units in every matching group (a layer; a (layer, expert) pair for
expert neurons) and, when the units' frequencies are given, the same number in
every activation-frequency bin of the group, drawn outside the tested set.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from sparcom_jax.analysis.common import C, by_category, jsonable
from sparcom_jax.analysis.identify import Identification
from sparcom_jax.categories import CATEGORIES, normalize_category, per_category_text

LossFn = Callable[[np.ndarray | None], Mapping[str, float]]
# (loss_fn, masks) -> [(losses, dropped mass or NaN)] of every mask, in order.
MaskRunner = Callable[[LossFn, Sequence[np.ndarray | None]], list[tuple[Mapping[str, float], float]]]

# Leading mask axes that form one matching group, per kind.
KIND_LEAD: dict[str, int] = {"neurons": 1, "experts": 1, "expert_neurons": 2}
FIELD_KIND: dict[str, str] = {"neuron_active": "neurons", "expert_routed": "experts",
                              "expert_neuron_active": "expert_neurons"}
# Percentiles of the per-draw excess reported in to_dict().
EXCESS_PERCENTILES = (5, 50, 95)
# A category's loss resting on fewer scored held-out records than this, or on a smaller
# share of its held-out records (the rest lost every response token to max_length), is
# flagged: a handful of (short-prompt) records would stand for the whole category.
MIN_SCORED_RECORDS = 5
MIN_SCORED_FRACTION = 0.5


def coverage_warnings(coverage: Mapping[str, Mapping[str, int]] | None) -> list[str]:
    """One line per category whose loss rests on few held-out records.

    Args:
      coverage: {category: {"records": held-out records, "scored_records": those that
        keep a response token within max_length, "response_tokens": scored tokens}}
        (`CategoryLoss.coverage`), or None (nothing to check).

    Returns:
      The lines, in CATEGORIES order: a category is flagged when its scored records are
      fewer than MIN_SCORED_RECORDS or below MIN_SCORED_FRACTION of its held-out records,
      with the fix: a longer max_length when prompts cut records away, more held-out
      records when none was cut.
    """
    lines = []
    for cat in CATEGORIES:
        cov = (coverage or {}).get(cat)
        if not cov or not cov["records"]:
            continue
        n, k, t = cov["records"], cov["scored_records"], cov["response_tokens"]
        if k < MIN_SCORED_FRACTION * n or MIN_SCORED_RECORDS > k < n:
            lines.append(f"{cat}: its causal-check loss rests on {k} of {n} held-out records ({t} response "
                         f"tokens); the prompts of the rest fill max_length: raise data.max_length")
        elif k < MIN_SCORED_RECORDS:  # nothing was cut: there are few held-out records
            lines.append(f"{cat}: its causal-check loss rests on only {k} held-out records ({t} response "
                         f"tokens): raise ablation.max_records or hold out more records (data.split)")
    return lines


@dataclasses.dataclass(repr=False)
class AblationResult:
    """Loss increases; rows = ablated category, columns = evaluated category.

    Attributes:
      kind: "neurons", "experts" or "expert_neurons".
      baseline: {category: loss without ablation}.
      isn: float [C, C] loss(ablate S(a)) on b minus baseline on b.
      random: float [C, C] mean over draws of the same for the matched random sets.
      random_draws: float [D, C, C] per draw.
      set_sizes: int [C] |S(a)|.
      n_random: D.
      seed: RNG seed of the random draws.
      dropped_mass: float [C] routing mass dropped when S(a) is ablated (from
        ``loss_fn.last_dropped_mass``), or None when the callback gives none.
      random_dropped_mass: float [D, C] the same for the random draws, or None.
      off_bin: int [D, C] units of a draw that had to come from another
        frequency bin of their group (the bin had too few units outside S(a)).
      in_set: int [D, C] units of a draw taken from S(a) itself (the group had
        too few units outside S(a)); 0 when the control is clean.
      matching: how the random sets were matched (JSON-safe dict).
      set_frequency: float [C] mean matching frequency of the units of S(a), or
        None when the sets were matched on counts only.
      coverage: {category: {"records", "scored_records", "response_tokens"}}: the
        held-out records and response tokens each category's loss rests on (from
        ``loss_fn.coverage``), or None when the callback gives none; see
        `coverage_warnings`.
      random_frequency: float [D, C] the same for each random draw, or None. Bins
        match the set only as finely as their width: a top-eps set fills the top
        of its layer's frequency range, whose units outside the set fire less, so
        the draws can fire markedly less than the set (a frequency effect that
        the excess then carries).
    """

    kind: str
    baseline: dict[str, float]
    isn: np.ndarray
    random: np.ndarray
    random_draws: np.ndarray
    set_sizes: np.ndarray
    n_random: int
    seed: int
    dropped_mass: np.ndarray | None = None
    random_dropped_mass: np.ndarray | None = None
    off_bin: np.ndarray | None = None
    in_set: np.ndarray | None = None
    matching: dict = dataclasses.field(default_factory=dict)
    set_frequency: np.ndarray | None = None
    random_frequency: np.ndarray | None = None
    coverage: dict | None = None

    def __repr__(self) -> str:
        own = np.diag(self.excess)
        sd = np.diag(self.excess_spread()["std"])
        return "\n".join([
            f"AblationResult: {self.kind}, {self.n_random} matched random draws (seed {self.seed})",
            f"  set sizes         {per_category_text(self.set_sizes)}",
            "  own-category loss increase beyond random, mean ± sd over draws (nats per response token):",
            "    " + per_category_text([f"{e:+.3g} ± {d:.2g}" for e, d in zip(own, sd)]),
            *(f"  warning: {w}" for w in coverage_warnings(self.coverage)),
        ])

    @property
    def excess(self) -> np.ndarray:
        """float [C, C] loss increase beyond the random control (mean over draws)."""
        return self.isn - self.random

    def excess_spread(self) -> dict[str, np.ndarray]:
        """Spread of the per-draw excess isn - random_draws[d] over the D draws.

        Returns:
          dict of float [C, C]: `std` (population sd over draws), `p<q>` for q in
          EXCESS_PERCENTILES, and `random_ge_fraction`: the share of draws whose
          loss increase is >= the specific set's (small = the specific set hurts
          more than almost every matched random set), and `p_value`, the
          Monte-Carlo p-value of that comparison, (1 + #{draws >= set}) / (1 + D):
          its smallest value is 1 / (1 + D), so 10 draws can never give p < 0.05
          (a fraction of 0 is p = 1/11, not p = 0). NaN without draws.
        """
        d = np.asarray(self.random_draws, dtype=np.float64)
        nan = np.full((C, C), np.nan)
        if d.shape[0] == 0:
            return {"std": nan, **{f"p{q}": nan for q in EXCESS_PERCENTILES}, "random_ge_fraction": nan,
                    "p_value": nan}
        ex = self.isn[None] - d
        ok = np.isfinite(ex).all(0)
        out = {"std": np.where(ok, ex.std(0), np.nan)}
        for q in EXCESS_PERCENTILES:
            out[f"p{q}"] = np.where(ok, np.percentile(np.where(ok, ex, 0.0), q, axis=0), np.nan)
        n_ge = (d >= self.isn[None]).sum(0)
        out["random_ge_fraction"] = np.where(ok, n_ge / d.shape[0], np.nan)
        out["p_value"] = np.where(ok, (1 + n_ge) / (1 + d.shape[0]), np.nan)
        return out

    def to_dict(self) -> dict:
        """JSON-safe dict (NaN -> None); matrices as nested lists in CATEGORIES order."""
        spread = self.excess_spread()
        return jsonable({
            "kind": self.kind,
            "categories": list(CATEGORIES),
            "baseline": self.baseline,
            "isn": self.isn,
            "random": self.random,
            "excess": self.excess,
            "excess_std": spread["std"],
            "excess_percentiles": {str(q): spread[f"p{q}"] for q in EXCESS_PERCENTILES},
            "random_ge_fraction": spread["random_ge_fraction"],
            "p_value": spread["p_value"],
            "random_draws": self.random_draws,
            "set_sizes": by_category(self.set_sizes),
            "n_random": self.n_random,
            "seed": self.seed,
            "dropped_mass": None if self.dropped_mass is None else by_category(self.dropped_mass),
            "random_dropped_mass": self.random_dropped_mass,
            "off_bin": self.off_bin,
            "in_set": self.in_set,
            "matching": self.matching,
            "set_frequency": None if self.set_frequency is None else by_category(self.set_frequency),
            "random_frequency": self.random_frequency,
            "coverage": self.coverage,
            "coverage_warnings": coverage_warnings(self.coverage),
        })

    @classmethod
    def from_dict(cls, d: dict) -> "AblationResult":
        """Inverse of to_dict (None -> NaN); older files without the new keys load too."""
        def nan(v):
            return [nan(x) for x in v] if isinstance(v, list) else (np.nan if v is None else v)

        def arr(v, dtype=float):
            return None if v is None else np.asarray(nan(v), dtype=dtype)

        draws = arr(d["random_draws"]) if d["random_draws"] else np.zeros((0, C, C))
        dm = d.get("dropped_mass")
        sf = d.get("set_frequency")
        return cls(kind=d["kind"], baseline=d["baseline"], isn=arr(d["isn"]), random=arr(d["random"]),
                   random_draws=draws, set_sizes=np.asarray([d["set_sizes"][c] for c in CATEGORIES]),
                   n_random=d["n_random"], seed=d["seed"],
                   dropped_mass=None if dm is None else arr([dm[c] for c in CATEGORIES]),
                   random_dropped_mass=arr(d.get("random_dropped_mass")),
                   off_bin=arr(d.get("off_bin"), np.int64), in_set=arr(d.get("in_set"), np.int64),
                   matching=d.get("matching") or {},
                   set_frequency=None if sf is None else arr([sf[c] for c in CATEGORIES]),
                   random_frequency=arr(d.get("random_frequency")), coverage=d.get("coverage"))


def frequency_bins(freq: np.ndarray, n_bins: int, lead: int = 1) -> np.ndarray:
    """Quantile bins of unit frequencies within each matching group.

    Bin edges are the 1/n_bins, ..., (n_bins-1)/n_bins quantiles of the group's
    frequencies; unit u goes to the number of edges strictly below its
    frequency, so equal frequencies always share a bin (never-firing units
    form their own bin when they fill at least one quantile) and bins can be
    fewer than n_bins when many units tie.

    Args:
      freq: float [*G, W] unit frequencies, the first `lead` axes the group
        (e.g. [L, F] with lead=1, [L, E, G] with lead=2).
      n_bins: bins per group (1 = count matching only).
      lead: leading axes forming a group.

    Returns:
      int [*G, W] bin index per unit.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    freq = np.asarray(freq, dtype=np.float64)
    rows = freq.reshape(int(np.prod(freq.shape[:lead])), -1)
    qs = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    out = np.zeros(rows.shape, np.int64)
    for g, row in enumerate(rows):
        out[g] = np.searchsorted(np.quantile(row, qs), row, side="left")
    return out.reshape(freq.shape)


def _draw_group(members: np.ndarray, bins: np.ndarray, exclude: bool,
                rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """One group's random set: bool [W], units drawn off their bin, units drawn from the set."""
    out = np.zeros_like(members)
    free = ~members if exclude else np.ones_like(members)
    off = inside = 0
    need = np.bincount(bins[members], minlength=int(bins.max()) + 1)
    short = {}
    for b in np.flatnonzero(need):
        cand = np.flatnonzero(free & ~out & (bins == b))
        take = min(int(need[b]), cand.size)
        out[rng.choice(cand, size=take, replace=False)] = True
        if take < need[b]:
            short[b] = int(need[b]) - take
    # A bin without enough units outside the set borrows from the nearest bins.
    for b, k in short.items():
        pool = np.flatnonzero(free & ~out)
        if pool.size:
            key = np.abs(bins[pool] - b) + rng.random(pool.size)  # nearest first, random within
            pick = pool[np.argsort(key, kind="stable")[:k]]
            out[pick] = True
            off += pick.size
            k -= pick.size
        if k:  # only the tested set itself is left
            pool = np.flatnonzero(~out)
            out[rng.choice(pool, size=k, replace=False)] = True
            inside += k
    return out, off, inside


def matched_random(
    mask: np.ndarray, rng: np.random.Generator, bins: np.ndarray | None = None, *,
    exclude: bool = True, lead: int = 1,
) -> tuple[np.ndarray, int, int]:
    """A random set matching `mask` per group (and per frequency bin when given).

    Args:
      mask: bool [*G, W] the tested set; the first `lead` axes form a group.
      rng: generator (draw order: group, then bin).
      bins: int [*G, W] frequency bin of each unit (frequency_bins), or None
        (one bin: count matching only).
      exclude: draw outside the tested set (a unit of the set is used only when
        the group has too few others).
      lead: leading axes forming a group.

    Returns:
      (bool [*G, W] random set, units drawn outside their bin, units drawn from the set).
    """
    rows = mask.reshape(int(np.prod(mask.shape[:lead])), -1)
    b = np.zeros(rows.shape, np.int64) if bins is None else np.asarray(bins).reshape(rows.shape)
    out = np.zeros_like(rows)
    off = inside = 0
    for g in np.flatnonzero(rows.any(1)):
        out[g], o, i = _draw_group(rows[g], b[g], exclude, rng)
        off, inside = off + o, inside + i
    return out.reshape(mask.shape), off, inside


def random_like(mask: np.ndarray, rng: np.random.Generator, bins: np.ndarray | None = None, *,
                exclude: bool = False, lead: int = 1) -> np.ndarray:
    """A random mask with the same number of True per layer (group), uniform within each
    layer by default; see matched_random for `bins`, `exclude` and `lead`.

    Args:
      mask: bool [L, ...].
      rng: generator.

    Returns:
      bool [L, ...].
    """
    return matched_random(mask, rng, bins, exclude=exclude, lead=lead)[0]


def _row(losses: Mapping[str, float], baseline: dict[str, float]) -> np.ndarray:
    losses = {normalize_category(k): float(v) for k, v in losses.items()}
    return np.array([losses.get(c, np.nan) - baseline.get(c, np.nan) for c in CATEGORIES])


def dropped_mass(loss_fn) -> float:
    """The routing mass the last call of `loss_fn` dropped (`last_dropped_mass`), NaN when it gives none."""
    v = getattr(loss_fn, "last_dropped_mass", None)
    return np.nan if v is None else float(v)


def run_in_order(loss_fn: LossFn, masks: Sequence[np.ndarray | None]) -> list[tuple[Mapping[str, float], float]]:
    """The default `MaskRunner`: `loss_fn` on each mask in turn, with the mass each call dropped."""
    return [(loss_fn(m), dropped_mass(loss_fn)) for m in masks]


def ablation_matrix(
    category_sets: Mapping[str, np.ndarray],
    loss_fn: LossFn,
    *,
    n_random: int = 10,
    seed: int = 0,
    kind: str = "neurons",
    frequency: np.ndarray | None = None,
    n_bins: int = 10,
    run: MaskRunner = run_in_order,
) -> AblationResult:
    """Loss increase of every category when each category's set is switched off.

    Args:
      category_sets: {category: bool [L, F] (neurons), [L, E] (experts) or
        [L, E, G] (expert neurons)}; missing categories give NaN rows.
      loss_fn: mask (True = off) or None -> {category: mean loss}; may expose
        `last_dropped_mass` after each call, and `coverage` (see AblationResult).
      n_random: random control draws per category (default 10).
      seed: RNG seed (draw order: category, then draw, then group, then bin).
      kind: "neurons", "experts" or "expert_neurons" (matched per layer, per
        layer, per (layer, expert)); for experts a layer may not lose all its
        experts, since routing then has nothing left.
      frequency: float, the mask's shape: each unit's activation frequency in the
        ablated model (e.g. `Identification.unit_frequency()`); random sets then
        also match the set's count in each of `n_bins` quantile bins of it
        within every group. None matches counts per group only.
      n_bins: frequency bins per group (at most one per 4 units of a group).
      run: evaluates the masks, all drawn first (baseline None, then per category
        its set and its draws): `run_in_order` by default; the pipeline passes one
        that shares them among processes. The draws do not depend on the losses, so
        the result is the same whichever runs them.

    Returns:
      An AblationResult. Random sets are always drawn outside the tested set
      (AblationResult.in_set counts the exceptions). An empty set ablates
      nothing: its rows are 0 without calling the model.
    """
    if kind not in KIND_LEAD:
        raise ValueError(f"kind must be one of {tuple(KIND_LEAD)}, got {kind!r}")
    lead = KIND_LEAD[kind]
    sets = {normalize_category(k): np.asarray(v, dtype=bool) for k, v in category_sets.items()}
    bins = None
    if frequency is not None:
        shapes = {v.shape for v in sets.values()}
        if shapes and shapes != {np.shape(frequency)}:
            raise ValueError(f"frequency has shape {np.shape(frequency)}, the sets {sorted(shapes)}")
        # At least 4 units per bin, so that a bin keeps units outside the tested set
        # (8 experts per layer get 2 bins, 11,008 neurons get n_bins).
        width = int(np.prod(np.shape(frequency)[lead:]))
        n_bins = min(n_bins, max(1, width // 4))
        bins = frequency_bins(frequency, n_bins, lead)
    freq64 = None if frequency is None else np.asarray(frequency, np.float64)  # (once, not per draw)
    isn = np.full((C, C), np.nan)
    draws = np.full((n_random, C, C), np.nan)
    sizes = np.zeros(C, np.int64)
    dropped = np.full(C, np.nan)
    rdropped = np.full((n_random, C), np.nan)
    off_bin = np.zeros((n_random, C), np.int64)
    in_set = np.zeros((n_random, C), np.int64)
    # The frequency match each draw achieved (bins match only as finely as they are wide).
    set_freq = None if frequency is None else np.full(C, np.nan)
    rand_freq = None if frequency is None else np.full((n_random, C), np.nan)
    rng = np.random.default_rng(seed)
    masks: list[np.ndarray | None] = [None]  # the baseline first
    slots: list[tuple[int, int | None]] = []  # (ablated category, draw or None for its set) of masks[1:]
    for a, cat in enumerate(CATEGORIES):
        if cat not in sets:
            continue
        mask = sets[cat]
        if kind == "experts":
            full = mask.reshape(mask.shape[0], -1).all(1)
            if full.any():
                raise ValueError(
                    f"{cat}: its ISEs cover every expert of layer(s) {np.flatnonzero(full).tolist()}"
                )
        sizes[a] = mask.sum()
        if not sizes[a]:
            isn[a] = draws[:, a] = 0.0
            dropped[a] = rdropped[:, a] = 0.0
            continue
        masks.append(mask)
        slots.append((a, None))
        if frequency is not None:
            set_freq[a] = freq64[mask].mean()
        for d in range(n_random):
            rmask, off_bin[d, a], in_set[d, a] = matched_random(mask, rng, bins, exclude=True, lead=lead)
            if frequency is not None:
                rand_freq[d, a] = freq64[rmask].mean()
            masks.append(rmask)
            slots.append((a, d))
    (base, _), *results = run(loss_fn, masks)
    baseline = {normalize_category(k): float(v) for k, v in base.items()}
    for (a, d), (losses, mass) in zip(slots, results, strict=True):
        if d is None:
            isn[a], dropped[a] = _row(losses, baseline), mass
        else:
            draws[d, a], rdropped[d, a] = _row(losses, baseline), mass
    rand = draws.mean(0) if n_random else np.full((C, C), np.nan)
    has_mass = np.isfinite(dropped[sizes > 0]).any()
    return AblationResult(
        kind=kind, baseline=baseline, isn=isn, random=rand, random_draws=draws, set_sizes=sizes,
        n_random=n_random, seed=seed, dropped_mass=dropped if has_mass else None,
        random_dropped_mass=rdropped if has_mass else None, off_bin=off_bin, in_set=in_set,
        matching={"group": "layer, expert" if lead == 2 else "layer",
                  "frequency_bins": None if bins is None else n_bins,
                  "exclude_tested_set": True},
        set_frequency=set_freq, random_frequency=rand_freq, coverage=getattr(loss_fn, "coverage", None))


def ablate_identification(ident: Identification, loss_fn: LossFn, **kw) -> AblationResult:
    """ablation_matrix on an identification's category sets, random sets matched on the
    units' mean frequency over all instructions (kind from the count field).

    Args:
      ident: the ablated model's identification.
      loss_fn: see ablation_matrix.
      **kw: n_random, seed, n_bins (see ablation_matrix).
    """
    return ablation_matrix(ident.sets(), loss_fn, kind=FIELD_KIND[ident.field],
                           frequency=ident.unit_frequency(), **kw)
