"""Causal check: switch off a category's ISNs (ISEs, expert neurons) and measure every category's loss.

Axis letters: see `sparcom_jax.axes`.

The model execution lives elsewhere; this module orchestrates it through a
callback ``loss_fn(mask) -> {category: mean loss on its reference responses}``
where `mask` is bool [L, F] (neurons: True = activation forced to 0), [L, E]
(experts: True = removed from routing, as the model side implements it) or
[L, E, G] (expert neurons), and None means no ablation (the baseline). After
each call the callback may expose the routing mass the mask dropped as a float
attribute ``loss_fn.last_dropped_mass``; it is recorded when present, and so is
``loss_fn.last_category_mass`` ({category: the mass dropped on its tokens}).

Mass-matched controls (`mass_matched_random`). Experts (`expert_mass`): random expert sets
outside the tested set that drop, per layer, as much routing mass on the ablated category's
tokens as the set dropped when it was removed (its experts' mass in its own pass, per layer,
from ``loss_fn.last_expert_mass``), the candidates valued at their mass in the baseline
pass (`baseline_expert_mass`); so the sets' passes run first and the draws in a second
round. What each draw actually dropped is recorded. Neurons and expert neurons
(`firing_mass`): random units outside the set that fire, per layer, on average as often on
the category's held-out records as the set, each unit's firing counted in the unablated
pass (``loss_fn.last_unit_firing``, `baseline_unit_firing`; or on the identification
records, `ablate_identification(firing_source="identification")`); every unit's firing is
known before the ablated passes, so the draws run in the same round as the others.

Random controls: for each category set and draw, a random set with the same
number of units in every matching group (a layer; a (layer, expert) pair for
expert neurons), drawn outside the tested set and, when the units' frequencies
are given, unit by unit among the units of the group nearest in frequency to each
unit of the set. Where the set holds its group's most frequent units nothing
outside it fires as often; the result records how close the draws came.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from sparcom_jax.analysis.common import C, by_category, jsonable
from sparcom_jax.analysis.identify import Identification
from sparcom_jax.categories import CATEGORIES, normalize_category, per_category_text

LossFn = Callable[[np.ndarray | None], Mapping[str, float]]
# (loss_fn, masks) -> [(losses, dropped mass or NaN, {category: mass dropped on its tokens} or None,
# {category: float [L] the same per layer} or None)] of every mask, in order.
PassResult = tuple[Mapping[str, float], float, Mapping[str, float] | None, Mapping[str, np.ndarray] | None]
MaskRunner = Callable[[LossFn, Sequence[np.ndarray | None]], list[PassResult]]

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
# Each unit of a tested set is replaced by one of the NEIGHBOURS free units of its group
# nearest in frequency: 1 makes every draw the same set (up to ties), more lets the draws
# fire less than the closest match. On the demo's sets 2 came within 0.002 of the closest
# match for neurons and 0.05 for experts, with 7-14 different expert sets in 19 draws
# (docs/analysis.md, "Random controls").
NEIGHBOURS = 2
# Draws firing on average less than (1 - FREQUENCY_GAP) x the set's mean frequency are
# flagged (`matching_warnings`): the excess may then be partly the removal of busier units.
FREQUENCY_GAP = 0.1
# Mass-matched draws dropping on average more than MASS_TOLERANCE x the set's mass more
# (or less) than the set are flagged (`matching_warnings`): that control is then harsher
# (milder) than the set, and the excess against it understated (overstated).
MASS_TOLERANCE = 0.1
# A firing-mass-matched set carrying more than (1 + MAGNITUDE_GAP) x its draws' mean activation
# magnitude is flagged (`matching_warnings`): with the firing matched, its units fire more strongly,
# and part of its excess over that control can be the removal of more activation.
MAGNITUDE_GAP = 0.1
# What `AblationResult.set_layer_magnitude` measures (recorded in to_dict(): a file without it
# did not measure it): each unit's activation A summed where A > 0 (a unit fires when A > 0) over
# the tokens its firing is counted on, per token of a record, averaged over the category's
# held-out records, in the unablated pass (`CategoryLoss.last_unit_magnitude`).
MAGNITUDE_MEASURE = "positive_activation_per_token/held_out_firing_scope"
# Which categories a neuron check gives firing-mass-matched draws (`ablation_matrix(mass_where=)`), and
# magnitude-matched ones (`ablation_matrix(magnitude_where=)`: "where_warned" there means the categories whose
# set carries more than (1 + MAGNITUDE_GAP) x its firing-mass-matched draws' activation magnitude).
MASS_WHERE = ("always", "where_warned")
# Where the firing-mass-matched control's masses are counted (`ablate_identification(firing_source=)`):
# on the held-out records the loss is measured on (in the unablated pass), or the identification's.
FIRING_SOURCES = ("held_out", "identification")


def _thin_coverage(coverage: Mapping[str, Mapping[str, int]] | None) -> list[tuple[str, int, int, int, bool]]:
    """(category, scored records, held-out records, response tokens, whether prompts cut
    records away) of each category whose loss rests on few held-out records, in CATEGORIES
    order: its scored records are fewer than MIN_SCORED_RECORDS or below
    MIN_SCORED_FRACTION of its held-out records."""
    out = []
    for cat in CATEGORIES:
        cov = (coverage or {}).get(cat)
        if not cov or not cov["records"]:
            continue
        n, k, t = cov["records"], cov["scored_records"], cov["response_tokens"]
        if k < MIN_SCORED_FRACTION * n or MIN_SCORED_RECORDS > k < n:
            out.append((cat, k, n, t, True))
        elif k < MIN_SCORED_RECORDS:  # nothing was cut: there are few held-out records
            out.append((cat, k, n, t, False))
    return out


_CUT_FIX = "the prompts of the rest fill max_length: raise data.max_length"
_FEW_FIX = "raise ablation.max_records or hold out more records (data.split)"


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
      records when none was cut. `coverage_log_lines` puts them on one line for a log.
    """
    return [f"{cat}: its causal-check loss rests on {k} of {n} held-out records ({t} response tokens); {_CUT_FIX}"
            if cut else f"{cat}: its causal-check loss rests on only {k} held-out records ({t} response tokens): "
            f"{_FEW_FIX}" for cat, k, n, t, cut in _thin_coverage(coverage)]


def coverage_log_lines(coverage: Mapping[str, Mapping[str, int]] | None) -> list[str]:
    """`coverage_warnings` for a log: the one category's line when one is flagged, else one
    line naming every flagged category with its numbers (scored of held-out records,
    response tokens), grouped by fix; [] when none is."""
    thin = _thin_coverage(coverage)
    if len(thin) < 2:
        return coverage_warnings(coverage)
    groups = [", ".join(f"{cat} {k} of {n} ({t} response tokens)" for cat, k, n, t, c in thin if c == cut) + f": {fix}"
              for cut, fix in ((True, _CUT_FIX), (False, _FEW_FIX)) if any(c == cut for *_, c in thin)]
    return [f"the causal-check loss of {len(thin)} categories rests on few held-out records (scored of held-out): "
            + "; ".join(groups)]


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
      in_set: int [D, C] units of a draw taken from S(a) itself (the group had
        too few units outside S(a)); 0 when the control is clean.
      matching: how the random sets were matched (JSON-safe dict).
      set_frequency: float [C] mean matching frequency of the units of S(a), or
        None when the sets were matched on counts only.
      closest_frequency: float [C] the same for the closest draw the data allow (every
        unit of S(a) replaced by its nearest free unit, `neighbours` = 1), or None.
      above_others: int [C] units of S(a) firing more often than every unit of their
        group outside S(a) (no draw can match them), or None.
      coverage: {category: {"records", "scored_records", "response_tokens"}}: the
        held-out records and response tokens each category's loss rests on (from
        ``loss_fn.coverage``), or None when the callback gives none; see
        `coverage_warnings`.
      random_frequency: float [D, C] the same for each random draw, or None. A set
        holding its layers' most frequent units cannot be matched exactly (nothing
        outside it fires as often): the draws then fire less than the set, a
        frequency effect that the excess carries (see `matching_warnings`).
      mass_random_draws: float [M, C, C] loss increases of the mass-matched expert draws
        (`mass_matched_random`), or None when that control was not run.
      set_category_mass: float [C] routing mass S(a) dropped on category a's own
        held-out tokens (measured), or None.
      mass_random_mass: float [M, C] the same for each mass-matched draw (measured), or None.
      mass_random_sizes: int [M, C] experts in each mass-matched draw, or None.
      set_layer_mass: float [C, L] per layer, the routing mass S(a) dropped on a's own
        held-out tokens, measured in its own pass: what the mass-matched draws match; or None.
      set_layer_estimate: float [C, L] the same as the unablated model estimates it (its
        experts' baseline mass), beside it to show how removing the set moved the routing; for
        neurons with held-out firing (`mass_source`), the set's firing on the category's
        identification records, beside it to show how much less (or more) the set fires on
        new records than on those it was chosen from; or None.
      mass_random_layer_mass: float [M, C, L] per mass-matched draw and layer, the mass it
        dropped on a's own tokens, measured in its pass (its error is this minus
        `set_layer_mass`, see `mass_errors`); or None (also in files made before it was kept).
      mass_random_layer_estimate: float [M, C, L] the same as the unablated model estimates it:
        what the selection rule (`mass_fill`) matched to the target; or None.
      set_mass_matrix: float [C, C] the routing mass S(a) dropped (row a) on each category b's
        held-out tokens (column b), measured; its diagonal is `set_category_mass`. Only the
        diagonal is matched: the off-diagonal cells of the mass-matched excess compare the set
        with draws whose mass on b's tokens can differ (see `mass_random_mass_matrix`). Or None.
      mass_random_mass_matrix: float [M, C, C] the same for each mass-matched draw, or None.
      mass_where: which categories got mass-matched draws: "always" (each with a set) or
        "where_warned" (neurons: those whose frequency-matched draws fire less than the set,
        `fires_less`); None where the control did not run. For experts the mass is the
        routing mass, measured in the passes; for neurons and expert neurons it is the
        firing mass, each unit's firing frequency on the category's records (`mass_source`)
        summed over the set: the expected number of its units firing per token (so a draw's
        measured and estimated mass are the same number, and so are the set's but for
        `set_layer_estimate` under held-out firing).
      mass_source: where the masses were measured: "held_out" (experts always: the routing
        mass in the passes; neurons and expert neurons by default: each unit's firing counted
        in the unablated pass on the category's held-out records, `CategoryLoss.last_unit_firing`)
        or "identification" (the firing of the identification counts, `category_mean`); None
        where the control did not run or the caller did not say.
      firing_records: with held-out firing (`mass_source` "held_out", neurons and expert neurons),
        {category: its held-out records with a token in the counted scope}
        (`CategoryLoss.firing_records`): how many records each category's firing, the
        control's target, rests on (see `matching_warnings`); None otherwise (also in
        files made before it was kept).
      set_layer_magnitude: float [C, L] with held-out firing, per layer, the activation magnitude
        S(a)'s units carry on a's held-out records (each unit's `CategoryLoss.last_unit_magnitude`:
        its positive activation per token, where its firing is counted, summed over the set), where
        the firing-mass-matched control ran (NaN elsewhere); None where it was not measured (the
        identification's firing, a loss_fn without it, files made before it was kept).
      mass_random_layer_magnitude: float [M, C, L] the same for each firing-mass-matched draw; see
        `magnitude` and `matching_warnings`.
      magnitude_random_draws: float [N, C, C] loss increases of the magnitude-matched draws (random units
        outside the set carrying, per layer, on average the set's `set_layer_magnitude`: the same
        `mass_fill` as the firing-mass-matched draws, each unit valued at its magnitude), or None where
        that control was not run (also in files made before it existed); NaN rows for categories it
        did not run for.
      magnitude_random_sizes: int [N, C] units in each magnitude-matched draw, or None.
      magnitude_random_layer_magnitude: float [N, C, L] per magnitude-matched draw and layer, the
        magnitude it carries on a's held-out records (what it was matched on), or None.
      magnitude_random_layer_firing: float [N, C, L] the same draws' firing mass there (their units'
        held-out firing summed): matched in magnitude, they fire more often than the set where its
        units fire strongly (`magnitude_matched`'s `firing_ratio`); or None.
      magnitude_where: "always" or "where_warned" (only the categories whose set carries more than
        (1 + MAGNITUDE_GAP) x its firing-mass-matched draws' magnitude); None where not run.
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
    in_set: np.ndarray | None = None
    matching: dict = dataclasses.field(default_factory=dict)
    set_frequency: np.ndarray | None = None
    random_frequency: np.ndarray | None = None
    coverage: dict | None = None
    closest_frequency: np.ndarray | None = None
    above_others: np.ndarray | None = None
    mass_random_draws: np.ndarray | None = None
    set_category_mass: np.ndarray | None = None
    mass_random_mass: np.ndarray | None = None
    mass_random_sizes: np.ndarray | None = None
    set_layer_mass: np.ndarray | None = None
    set_layer_estimate: np.ndarray | None = None
    mass_random_layer_mass: np.ndarray | None = None
    mass_random_layer_estimate: np.ndarray | None = None
    set_mass_matrix: np.ndarray | None = None
    mass_random_mass_matrix: np.ndarray | None = None
    mass_where: str | None = None
    mass_source: str | None = None
    firing_records: dict[str, int] | None = None
    set_layer_magnitude: np.ndarray | None = None
    mass_random_layer_magnitude: np.ndarray | None = None
    magnitude_random_draws: np.ndarray | None = None
    magnitude_random_sizes: np.ndarray | None = None
    magnitude_random_layer_magnitude: np.ndarray | None = None
    magnitude_random_layer_firing: np.ndarray | None = None
    magnitude_where: str | None = None

    def __repr__(self) -> str:
        own = np.diag(self.excess)
        sd = np.diag(self.excess_spread()["std"])
        return "\n".join([
            f"AblationResult: {self.kind}, {self.n_random} matched random draws (seed {self.seed})",
            f"  set sizes         {per_category_text(self.set_sizes)}",
            "  own-category loss increase beyond random, mean ± sd over draws (nats per response token):",
            "    " + per_category_text([f"{e:+.3g} ± {d:.2g}" for e, d in zip(own, sd)]),
            *([] if self.mass_random_draws is None else [
                f"  own-category excess beyond the {self._mass_words()[3]}-matched {self.kind[:-1].replace('_', ' ')} "
                "draws:",
                "    " + per_category_text([f"{e:+.3g}" for e in np.diag(self.mass_excess)])]),
            *([] if self.magnitude() is None else [
                "  activation magnitude of the set over its firing-mass-matched draws' (mean):",
                "    " + per_category_text([f"{r:.3g} x" for r in self.magnitude()["ratio"]])]),
            *([] if self.magnitude_excess is None else [
                f"  own-category excess beyond the magnitude-matched {self.kind[:-1].replace('_', ' ')} draws:",
                "    " + per_category_text([f"{e:+.3g}" for e in np.diag(self.magnitude_excess)])]),
            *(f"  warning: {w}" for w in coverage_log_lines(self.coverage) + self.matching_warnings()),
        ])

    def matching_warnings(self) -> list[str]:
        """One line per category whose random draws are lighter than its set.

        Returns:
          The lines, in CATEGORIES order. A category is flagged when the draws' mean
          frequency is below (1 - FREQUENCY_GAP) x the set's (the line gives both, the
          closest match the data allow, `closest_frequency`, and the set's units that no
          unit outside it matches, `above_others`): part of its excess can then be the
          effect of removing busier units, whatever they are specific to. Experts are
          also flagged when the set drops more routing mass than every draw: their
          excess cannot then be told apart from a larger disruption of the routing.
          Expert lines give the mass of the set and of the draws. Lines also flag mass-matched
          draws that missed their set's mass (`MASS_TOLERANCE`) and, with held-out firing, a
          category whose firing rests on few held-out records (`firing_records`, under the
          thresholds of `coverage_warnings`): that control's target is then noisy. And a set
          whose units carry more than (1 + MAGNITUDE_GAP) x the activation magnitude of its
          firing-mass-matched draws (`magnitude`): matched on how often they fire, not on how
          strongly, so part of its excess over them can be the removal of more activation.
        """
        if not self.n_random:
            return []
        unit = self.kind.replace("_", " ")
        group = "expert" if self.kind == "expert_neurons" else "layer"
        mass = self.kind == "experts" and self.dropped_mass is not None and self.random_dropped_mass is not None
        lines = []
        for a, cat in enumerate(CATEGORIES):
            parts, why = [], []
            if self.set_frequency is not None and self.random_frequency is not None:
                sf, rf = self.set_frequency[a], self.random_frequency[:, a]
                if fires_less(sf, rf):
                    close = ("" if self.closest_frequency is None
                             else f"; each replaced by its nearest outside the set: {self.closest_frequency[a]:.3g}")
                    parts.append(f"its matched random {unit} fire less often than its set ({rf.mean():.3g} "
                                 f"against {sf:.3g}{close})")
                    if self.above_others is not None and self.above_others[a]:
                        parts.append(f"{self.above_others[a]} of its {self.set_sizes[a]} {unit} fire more often "
                                     f"than every one of their {group} outside the set, so no draw can match them")
                    why.append("part of its excess can be the effect of removing busier units")
            if mass:
                dm, rdm = self.dropped_mass[a], self.random_dropped_mass[:, a]
                heavier = bool(np.isfinite(dm) and np.isfinite(rdm).all() and dm > rdm.max())
                if heavier:
                    why.append("it drops more routing mass than every draw, so its excess cannot be told apart "
                               "from a larger disruption of the routing")
                if why:
                    parts.append(f"routing mass dropped: {dm:.3g} by the set, {rdm.mean():.3g} by the draws "
                                 f"(at most {rdm.max():.3g})")
            if why:
                lines.append(f"{cat}: " + "; ".join(parts) + ": " + "; and ".join(why) + self._mass_outcome(a))
            lines += (self._mass_error_warning(a) + self._firing_records_warning(a) + self._magnitude_warning(a)
                      + self._magnitude_error_warning(a))
        return lines

    def magnitude(self) -> dict[str, np.ndarray] | None:
        """The activation magnitude the sets and their firing-mass-matched draws carry on each
        category's own held-out records (`set_layer_magnitude` summed over layers).

        Returns:
          float [C] `set`, `random_mean` (over the draws), `ratio` (set / random_mean) and
          `random_below` (the share of draws carrying less than the set); NaN where the control
          did not run or had no draws. None where the magnitude was not measured.
        """
        if self.set_layer_magnitude is None or self.mass_random_layer_magnitude is None:
            return None
        s, r = self.set_layer_magnitude.sum(-1), self.mass_random_layer_magnitude.sum(-1)
        if not r.shape[0]:
            nan = np.full(C, np.nan)
            return {"set": s, "random_mean": nan, "ratio": nan, "random_below": nan}
        mean = r.mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(mean > 0, s / mean, np.where(s > 0, np.inf, np.nan))
        below = np.where(np.isfinite(r).all(0), (r < s[None]).mean(0), np.nan)
        return {"set": s, "random_mean": mean, "ratio": np.where(np.isfinite(s), ratio, np.nan),
                "random_below": below}

    def _magnitude_warning(self, a: int) -> list[str]:
        """Category `a`'s line when its set carries more than (1 + MAGNITUDE_GAP) x its firing-mass-matched
        draws' mean activation magnitude ([] otherwise, and where it was not measured)."""
        mag = self.magnitude()
        if mag is None or not self.set_sizes[a] or not stronger(mag["set"][a], self.mass_random_layer_magnitude[:, a]):
            return []
        d, units = self.mass_random_layer_magnitude.shape[0], self.kind.replace("_", " ")
        return [f"{CATEGORIES[a]}: its set's {units} carry {mag['set'][a]:.3g} of positive activation per token on "
                f"its held-out records, its firing-mass-matched draws {mag['random_mean'][a]:.3g} on average "
                f"({mag['ratio'][a]:.2f} x; more than {round(mag['random_below'][a] * d)} of the {d} draws; "
                f"tolerance {MAGNITUDE_GAP:.0%}): matched on how often they fire, the set's units fire more "
                "strongly, so part of its excess over that control can be the removal of more activation, "
                "not what the units are specific to" + self._magnitude_outcome(a)]

    def _magnitude_outcome(self, a: int) -> str:
        """Where the magnitude-matched control ran for category `a`: what it found, for its warning line."""
        got = self.magnitude_matched()
        if got is None or not np.isfinite(got["random_mean"][a]):
            return ""
        n, p = self.magnitude_random_draws.shape[0], self.excess_spread(self.magnitude_random_draws)["p_value"][a, a]
        return (f"; the magnitude-matched control ({n} draws of {got['random_size_mean'][a]:.3g} units outside the "
                f"set, carrying {got['random_mean'][a]:.3g} of it and firing {got['firing_ratio'][a]:.2f} x "
                f"as often as the set) gives an own-category excess of {self.magnitude_excess[a, a]:+.3g} "
                f"(p = {p:.2g})")

    def magnitude_matched(self) -> dict[str, np.ndarray] | None:
        """How closely the magnitude-matched draws matched their sets, on each category's own held-out records.

        Returns:
          float [C]: `set` and `random_mean`, the activation magnitude the set and its draws (mean)
          carry (`set_layer_magnitude` summed over layers); `error_mean` and `error_abs_mean`, a draw's
          magnitude minus the set's, mean signed and absolute over draws; `set_firing` and
          `random_firing_mean`, the firing mass they carry there (expected units firing per token);
          `firing_ratio`, the draws' firing over the set's (above 1: matched in magnitude, the draws
          fire more often, on weaker units); `random_size_mean`, the draws' units. NaN for a category
          without draws. None where that control was not run.
        """
        if self.magnitude_random_draws is None or self.magnitude_random_layer_magnitude is None:
            return None
        s, sf = self.set_layer_magnitude.sum(-1), self.set_layer_mass.sum(-1)
        r, rf = self.magnitude_random_layer_magnitude.sum(-1), self.magnitude_random_layer_firing.sum(-1)
        if not r.shape[0]:
            nan = np.full(C, np.nan)
            return {"set": s, "random_mean": nan, "error_mean": nan, "error_abs_mean": nan, "set_firing": sf,
                    "random_firing_mean": nan, "firing_ratio": nan, "random_size_mean": nan}
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = rf.mean(0) / sf
        return {"set": s, "random_mean": r.mean(0), "error_mean": (r - s).mean(0),
                "error_abs_mean": np.abs(r - s).mean(0), "set_firing": sf, "random_firing_mean": rf.mean(0),
                "firing_ratio": np.where(sf > 0, ratio, np.nan),
                "random_size_mean": self.magnitude_random_sizes.mean(0).astype(np.float64)}

    def _magnitude_error_warning(self, a: int) -> list[str]:
        """Category `a`'s line when its magnitude-matched draws carried on average more than MASS_TOLERANCE
        of the set's activation magnitude more or less than the set ([] otherwise)."""
        got = self.magnitude_matched()
        if got is None or not self.set_sizes[a] or not np.isfinite(got["error_mean"][a]):
            return []
        sm, mean = got["set"][a], got["error_mean"][a]
        if not sm > 0 or abs(mean) <= MASS_TOLERANCE * sm:
            return []
        harsh = ("harsher than the set: its excess against them is understated" if mean > 0
                 else "milder than the set: its excess against them is overstated")
        return [f"{CATEGORIES[a]}: its magnitude-matched draws carried on average {sm + mean:.3g} of positive "
                f"activation per token against the set's {sm:.3g} ({mean / sm:+.0%}, mean |error| "
                f"{got['error_abs_mean'][a]:.3g}; tolerance {MASS_TOLERANCE:.0%}): that control is {harsh}"]

    def _firing_records_warning(self, a: int) -> list[str]:
        """Category `a`'s line when the held-out firing its firing-mass-matched draws were matched
        to rests on fewer than MIN_SCORED_RECORDS records, or on fewer than MIN_SCORED_FRACTION
        of its held-out records (the thresholds of `coverage_warnings`); [] otherwise, and where
        its control did not run."""
        cat = CATEGORIES[a]
        if (self.firing_records is None or cat not in self.firing_records or not self.set_sizes[a]
                or self.set_category_mass is None or not np.isfinite(self.set_category_mass[a])):
            return []
        k, n = self.firing_records[cat], ((self.coverage or {}).get(cat) or {}).get("records")
        few, low = k < MIN_SCORED_RECORDS, n is not None and k < MIN_SCORED_FRACTION * n
        if not (few or low):
            return []
        of = "" if n is None else f" of its {n}"
        rest = ("" if not low else "; the others have no token in the scope the sets were identified on "
                "(data.scope) and count 0")
        return [f"{cat}: the held-out firing its firing-mass-matched draws are matched to rests on {k}{of} "
                f"held-out records{rest}: that control's target is noisy, so its excess is too; hold out "
                "more records (data.split, ablation.max_records)"]

    def mass_errors(self) -> dict[str, np.ndarray | None]:
        """How closely the mass-matched draws matched their sets' mass on the category's own tokens.

        Returns:
          float [C] over each category's draws: `mean` and `abs_mean`, the mean signed and
          absolute error of the mass a draw dropped (measured in its pass) minus the set's;
          `estimate_mean` and `estimate_abs_mean`, the same for the draws' experts valued at
          their unablated estimates, the selection rule's own error (the rest is the routing
          the draw moved; None in files made before it was kept); float [C, L] `layer_mean`
          and `layer_abs_mean`, the measured errors per layer (None likewise). All None where
          the control did not run; NaN for a category without draws.
        """
        keys = ("mean", "abs_mean", "estimate_mean", "estimate_abs_mean", "layer_mean", "layer_abs_mean")
        if self.mass_random_mass is None:
            return dict.fromkeys(keys)

        def signed_abs(err):
            if err is None:
                return None, None
            if not err.shape[0]:
                return (np.full(err.shape[1:], np.nan),) * 2
            return err.mean(0), np.abs(err).mean(0)

        layer_target = self.set_layer_mass
        total_est = None if self.mass_random_layer_estimate is None or layer_target is None else (
            self.mass_random_layer_estimate.sum(-1) - layer_target.sum(-1))
        per_layer = None if self.mass_random_layer_mass is None or layer_target is None else (
            self.mass_random_layer_mass - layer_target)
        return dict(zip(keys, (*signed_abs(self.mass_random_mass - self.set_category_mass),
                               *signed_abs(total_est), *signed_abs(per_layer))))

    def _mass_error_warning(self, a: int) -> list[str]:
        """Category `a`'s line when its mass-matched draws dropped on average more than
        MASS_TOLERANCE of the set's mass more or less than the set ([] otherwise)."""
        err = self.mass_errors()
        if err["mean"] is None or not np.isfinite(err["mean"][a]) or not self.set_sizes[a]:
            return []
        sm, mean = self.set_category_mass[a], err["mean"][a]
        if not sm > 0 or abs(mean) <= MASS_TOLERANCE * sm:  # (a set dropping no mass has no share to miss by)
            return []
        harsh = ("harsher than the set: its excess against them is understated" if mean > 0
                 else "milder than the set: its excess against them is overstated")
        rule = ("" if err["estimate_mean"] is None or self.kind != "experts" else
                f"; valued at their unablated estimates they drop {err['estimate_mean'][a]:+.3f} beside the "
                "set's mass (the selection's own error, the rest is the routing the draws moved)")
        _, verb, what, name = self._mass_words()
        return [f"{CATEGORIES[a]}: its {name}-matched draws {verb} on average {sm + mean:.3g} of the {what} "
                f"against the set's {sm:.3g} ({mean / sm:+.0%}, mean |error| "
                f"{err['abs_mean'][a]:.3f}; tolerance {MASS_TOLERANCE:.0%}){rule}: that control is {harsh}"]

    def _mass_outcome(self, a: int) -> str:
        """Where the mass-matched control ran for category `a`: what it found, for a warning line."""
        if (self.mass_random_draws is None or not self.mass_random_draws.shape[0] or not self.set_sizes[a]
                or not np.isfinite(self.mass_random_draws[:, a]).any()):  # (its held-out tokens: none scored)
            return ""
        d = self.mass_random_draws.shape[0]
        ex, p = self.mass_excess[a, a], self.excess_spread(self.mass_random_draws)["p_value"][a, a]
        sm, rm, n = self.set_category_mass[a], self.mass_random_mass[:, a], self.mass_random_sizes[:, a]
        units, verb, what, name = self._mass_words()
        return (f"; the {name}-matched control ({d} draws of {n.mean():.3g} {units} outside the set, against its "
                f"{self.set_sizes[a]}) {verb} {np.mean(rm):.3g} of the {what} (the set "
                f"{sm:.3g}) and gives an own-category excess of {ex:+.3g} (p = {p:.2g})")

    def _mass_words(self) -> tuple[str, str, str, str]:
        """(units, verb, what their mass is, the control's name) for the mass-matched lines of this kind."""
        if self.kind == "experts":
            return "experts", "dropped", "routing mass on its own tokens", "mass"
        where = ("counted on its held-out records in the unablated pass" if self.mass_source == "held_out"
                 else "from the identification counts")
        return (self.kind.replace("_", " "), "carried", f"firing mass on its own records (firings per token, {where})",
                "firing-mass")

    @property
    def excess(self) -> np.ndarray:
        """float [C, C] loss increase beyond the random control (mean over draws)."""
        return self.isn - self.random

    @property
    def mass_excess(self) -> np.ndarray | None:
        """float [C, C] loss increase beyond the mass-matched control (mean over its draws), or None."""
        return self._excess_over(self.mass_random_draws)

    @property
    def magnitude_excess(self) -> np.ndarray | None:
        """float [C, C] loss increase beyond the magnitude-matched control (mean over its draws), or None."""
        return self._excess_over(self.magnitude_random_draws)

    def _excess_over(self, d: np.ndarray | None) -> np.ndarray | None:
        """float [C, C] `isn` minus the mean of a control's draws `d` (float [M, C, C]; NaN without
        draws), or None where that control was not run."""
        return None if d is None else self.isn - (d.mean(0) if d.shape[0] else np.nan)

    def excess_spread(self, draws: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Spread of the per-draw excess isn - random_draws[d] over the D draws (or over
        the float [D, C, C] `draws` given, e.g. `mass_random_draws`).

        Returns:
          dict of float [C, C]: `std` (population sd over draws), `p<q>` for q in
          EXCESS_PERCENTILES, and `random_ge_fraction`: the share of draws whose
          loss increase is >= the specific set's (small = the specific set hurts
          more than almost every matched random set), and `p_value`, the
          Monte-Carlo p-value of that comparison, (1 + #{draws >= set}) / (1 + D):
          its smallest value is 1 / (1 + D), so 10 draws can never give p < 0.05
          (a fraction of 0 is p = 1/11, not p = 0). NaN without draws.
        """
        d = np.asarray(self.random_draws if draws is None else draws, dtype=np.float64)
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
        def per_cat(v):
            return None if v is None else by_category(v)

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
            "dropped_mass": per_cat(self.dropped_mass),
            "random_dropped_mass": self.random_dropped_mass,
            "in_set": self.in_set,
            "matching": self.matching,
            "set_frequency": per_cat(self.set_frequency),
            "random_frequency": self.random_frequency,
            "closest_frequency": per_cat(self.closest_frequency),
            "above_others": per_cat(self.above_others),
            "matching_warnings": self.matching_warnings(),
            "coverage": self.coverage,
            "coverage_warnings": coverage_warnings(self.coverage),
            "mass_matched": self._mass_dict(),
            "magnitude_matched": self._magnitude_matched_dict(),
        })

    def _mass_dict(self) -> dict | None:
        """The mass-matched control's part of to_dict(), or None when it was not run."""
        if self.mass_random_draws is None:
            return None
        d = self.mass_random_draws
        return {**self._control_dict(d, self.mass_where),
                "mass": "routing" if self.kind == "experts" else "firing", "source": self.mass_source,
                "set_mass": by_category(self.set_category_mass),
                "random_mass": self.mass_random_mass, "random_sizes": self.mass_random_sizes,
                **{f"set_layer_{k}": None if v is None else by_category(v)
                   for k, v in (("mass", self.set_layer_mass), ("estimate", self.set_layer_estimate))},
                "set_mass_matrix": self.set_mass_matrix, "random_mass_matrix": self.mass_random_mass_matrix,
                "random_mass_matrix_mean": None if self.mass_random_mass_matrix is None or not d.shape[0]
                else self.mass_random_mass_matrix.mean(0),
                "random_layer_mass": self.mass_random_layer_mass,
                "random_layer_estimate": self.mass_random_layer_estimate,
                "random_layer_error": None if self.mass_random_layer_mass is None or self.set_layer_mass is None
                else self.mass_random_layer_mass - self.set_layer_mass[None],  # (derived: not read back)
                **{f"error_{k}": None if v is None else by_category(v)
                   for k, v in self.mass_errors().items()}, "error_tolerance": MASS_TOLERANCE,
                "firing_records": self.firing_records, "magnitude": self._magnitude_dict()}

    def _control_dict(self, d: np.ndarray, where: str | None) -> dict:
        """A control's draws `d` (float [M, C, C]) as to_dict() keeps them: their number, the categories
        they were drawn for (`where`), their mean, the excess over it with its spread and p-value."""
        spread = self.excess_spread(d)
        return {"n_random": int(d.shape[0]), "where": where,
                "random": d.mean(0) if d.shape[0] else np.full((C, C), np.nan),
                "excess": self._excess_over(d), "excess_std": spread["std"],
                "excess_percentiles": {str(q): spread[f"p{q}"] for q in EXCESS_PERCENTILES},
                "random_ge_fraction": spread["random_ge_fraction"], "p_value": spread["p_value"], "random_draws": d}

    def _magnitude_matched_dict(self) -> dict | None:
        """The magnitude-matched control's part of to_dict(); None where it was not run (so a file without
        it says so, `from_dict`)."""
        got = self.magnitude_matched()
        if got is None:
            return None
        return {**self._control_dict(self.magnitude_random_draws, self.magnitude_where), "measure": MAGNITUDE_MEASURE,
                **{k: by_category(v) for k, v in got.items()}, "error_tolerance": MASS_TOLERANCE,
                "random_sizes": self.magnitude_random_sizes,
                "random_layer_magnitude": self.magnitude_random_layer_magnitude,
                "random_layer_firing": self.magnitude_random_layer_firing}

    def _magnitude_dict(self) -> dict | None:
        """The activation magnitude's part of the mass-matched control's dict; None where it was not
        measured (so a file without it says so, `from_dict`)."""
        mag = self.magnitude()
        if mag is None:
            return None
        return {"measure": MAGNITUDE_MEASURE, "gap": MAGNITUDE_GAP, **{k: by_category(v) for k, v in mag.items()},
                "set_layer": by_category(self.set_layer_magnitude), "random_layer": self.mass_random_layer_magnitude}

    @classmethod
    def from_dict(cls, d: dict) -> "AblationResult":
        """Inverse of to_dict (None -> NaN); older files without the new keys load too."""
        def nan(v):
            return [nan(x) for x in v] if isinstance(v, list) else (np.nan if v is None else v)

        def arr(v, dtype=float):
            return None if v is None else np.asarray(nan(v), dtype=dtype)

        draws = arr(d["random_draws"]) if d["random_draws"] else np.zeros((0, C, C))
        def per_cat(key, dtype=float):
            v = d.get(key)
            return None if v is None else arr([v[c] for c in CATEGORIES], dtype)

        def per_draw(v, *tail):  # [M, ...] (None: absent from older files; []: no draws)
            return None if v is None else arr(v) if v else np.zeros((0, *tail))

        mm = d.get("mass_matched")
        mag = (mm or {}).get("magnitude")  # (None: not measured, also in files made before it was kept)
        mass = {} if mm is None else dict(
            set_layer_magnitude=None if mag is None else arr([mag["set_layer"][c] for c in CATEGORIES]),
            mass_random_layer_magnitude=None if mag is None else per_draw(mag["random_layer"], C, 0),
            mass_random_draws=arr(mm["random_draws"]) if mm["random_draws"] else np.zeros((0, C, C)),
            set_category_mass=arr([mm["set_mass"][c] for c in CATEGORIES]),
            mass_random_mass=arr(mm["random_mass"]) if mm["random_mass"] else np.zeros((0, C)),
            mass_random_sizes=arr(mm["random_sizes"], np.int64) if mm["random_sizes"] else np.zeros((0, C), np.int64),
            # (absent from files of the rule that matched the unablated estimate)
            **{f"set_layer_{k}": None if mm.get(f"set_layer_{k}") is None
               else arr([mm[f"set_layer_{k}"][c] for c in CATEGORIES]) for k in ("mass", "estimate")},
            # (absent from files made before the draws' own masses per layer were kept)
            **{f"mass_random_layer_{k}": per_draw(mm.get(f"random_layer_{k}"), C, 0) for k in ("mass", "estimate")},
            set_mass_matrix=arr(mm.get("set_mass_matrix")), mass_where=mm.get("where", "always"),
            # (absent from files made before the neurons' firing was measured on the held-out records)
            mass_source=mm.get("source", "identification" if mm.get("mass") == "firing" else "held_out"),
            mass_random_mass_matrix=per_draw(mm.get("random_mass_matrix"), C, C),
            firing_records=mm.get("firing_records"))  # (absent from files made before it was kept)
        mg = d.get("magnitude_matched")  # (None: not run, also in files made before it existed)
        if mg is not None:
            mass.update(magnitude_random_draws=per_draw(mg["random_draws"], C, C), magnitude_where=mg["where"],
                        magnitude_random_sizes=arr(mg["random_sizes"], np.int64) if mg["random_sizes"]
                        else np.zeros((0, C), np.int64),
                        **{f"magnitude_random_layer_{k}": per_draw(mg[f"random_layer_{k}"], C, 0)
                           for k in ("magnitude", "firing")})
        return cls(kind=d["kind"], baseline=d["baseline"], isn=arr(d["isn"]), random=arr(d["random"]),
                   random_draws=draws, set_sizes=per_cat("set_sizes", np.int64),
                   n_random=d["n_random"], seed=d["seed"],
                   dropped_mass=per_cat("dropped_mass"), random_dropped_mass=arr(d.get("random_dropped_mass")),
                   in_set=arr(d.get("in_set"), np.int64), matching=d.get("matching") or {},
                   set_frequency=per_cat("set_frequency"), random_frequency=arr(d.get("random_frequency")),
                   coverage=d.get("coverage"), closest_frequency=per_cat("closest_frequency"),
                   above_others=per_cat("above_others", np.int64), **mass)


def _nearest(avail_f: list[float], x: float, k: int) -> tuple[int, int]:
    """The slice [a, b) of the sorted `avail_f` within the k-th smallest |f - x| (ties included).

    The distances fall on both sides of x's insertion point, so the k nearest are found by
    walking outward, and the ties at the k-th distance by bisection: O(k + log W), not O(W).
    """
    mid = bisect.bisect_left(avail_f, x)
    i, j = mid - 1, mid
    for _ in range(k):  # merge the two sides, nearest first
        if j == len(avail_f) or (i >= 0 and abs(avail_f[i] - x) <= abs(avail_f[j] - x)):
            kth = abs(avail_f[i] - x)
            i -= 1
        else:
            kth = abs(avail_f[j] - x)
            j += 1
    if i >= 0 and abs(avail_f[i] - x) <= kth:  # ties beyond the walk: bisect for their end
        i = bisect.bisect_left(avail_f, True, 0, i, key=lambda v: abs(v - x) <= kth) - 1
    if j < len(avail_f) and abs(avail_f[j] - x) <= kth:
        j = bisect.bisect_left(avail_f, True, j, len(avail_f), key=lambda v: abs(v - x) > kth)
    return i + 1, j


def _draw_group(members: np.ndarray, freq: np.ndarray | None, order: np.ndarray | None, neighbours: int,
                exclude: bool, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One group's random set: bool [W] and the number of its units taken from the set itself.

    Each unit of the set, the most frequent first, gets a replacement drawn uniformly from
    the `neighbours` units nearest to it in frequency (with every unit tied at the last
    distance) among those still free; without `freq`, the replacements are uniform.
    `order` (int [W]) sorts `freq` ascending.
    """
    out = np.zeros_like(members)
    free = ~members if exclude else np.ones_like(members)
    units = np.flatnonzero(members)
    n = min(units.size, int(free.sum()))
    if freq is None:
        out[rng.choice(np.flatnonzero(free), size=n, replace=False)] = True
    else:
        # The free units sorted by frequency, shrinking as they are taken.
        avail = order[free[order]]
        avail_i, avail_f = avail.tolist(), freq[avail].tolist()
        # The most frequent units have the fewest comparable ones: they choose first, before
        # the less frequent units of the set take them.
        for x in np.sort(freq[units])[::-1][:n].tolist():
            a, b = _nearest(avail_f, x, min(neighbours, len(avail_f)))
            # In index order, as a scan of the group lists them (the draw depends on the
            # order); integers(n) is the index rng.choice draws, without its overhead.
            cand = sorted(avail_i[a:b])
            pick = cand[rng.integers(len(cand))]
            out[pick] = True
            at = a + avail_i[a:b].index(pick)
            del avail_i[at], avail_f[at]
    inside = units.size - n
    if inside:  # only the tested set itself is left
        out[rng.choice(np.flatnonzero(~out), size=inside, replace=False)] = True
    return out, inside


def _group_rows(frequency: np.ndarray, lead: int = 1) -> np.ndarray:
    """float64 [prod(G), W]: the frequencies (float [*G, W]) one row per group of the first `lead` axes."""
    return np.asarray(frequency, np.float64).reshape(int(np.prod(np.shape(frequency)[:lead])), -1)


def frequency_order(frequency: np.ndarray, lead: int = 1) -> np.ndarray:
    """int [prod(G), W]: each group's units sorted by ascending frequency (float [*G, W]);
    computed once and passed to every matched_random call on that frequency.

    Raises:
      ValueError: a frequency is NaN or infinite (no unit is nearest to it).
    """
    rows = _group_rows(frequency, lead)
    bad = int((~np.isfinite(rows)).sum())
    if bad:
        raise ValueError(f"frequency: {bad} unit(s) have a NaN or infinite frequency; give every unit a "
                         "finite frequency (e.g. Identification.unit_frequency())")
    return np.argsort(rows, axis=1, kind="stable")


def matched_random(
    mask: np.ndarray, rng: np.random.Generator, frequency: np.ndarray | None = None, *,
    neighbours: int = NEIGHBOURS, exclude: bool = True, lead: int = 1, order: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """A random set matching `mask` per group, each unit replaced by one of similar frequency.

    Args:
      mask: bool [*G, W] the tested set; the first `lead` axes form a group.
      rng: generator (draw order: group, then the group's set units, most frequent first).
      frequency: float [*G, W] each unit's activation frequency, or None (count matching
        only: a uniform draw of as many units per group).
      neighbours: each unit of the set is replaced by a unit drawn uniformly from the
        `neighbours` free units of its group nearest to it in frequency (and every unit
        tied with the farthest of them); 1 = the nearest unit (random only among ties).
      exclude: draw outside the tested set (a unit of the set is used only when
        the group has too few others).
      lead: leading axes forming a group.
      order: `frequency_order(frequency, lead)`, to sort once for many draws; computed
        when None.

    Returns:
      (bool [*G, W] random set, units drawn from the set).
    """
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    rows = mask.reshape(int(np.prod(mask.shape[:lead])), -1)
    f = None if frequency is None else np.asarray(frequency, np.float64).reshape(rows.shape)
    if f is not None and order is None:
        order = frequency_order(f)
    out = np.zeros_like(rows)
    inside = 0
    for g in np.flatnonzero(rows.any(1)):
        out[g], i = _draw_group(rows[g], None if f is None else f[g], None if f is None else order[g],
                                neighbours, exclude, rng)
        inside += i
    return out.reshape(mask.shape), inside


def above_all_others(mask: np.ndarray, frequency: np.ndarray, lead: int = 1) -> int:
    """Units of `mask` that fire more often than every unit of their group outside it: no
    draw outside the set can match them (bool mask and float frequency [*G, W])."""
    f = _group_rows(frequency, lead)
    rows = mask.reshape(f.shape)
    top_out = np.where(rows, -np.inf, f).max(1, keepdims=True)
    return int((rows & (f > top_out)).sum())


def random_like(mask: np.ndarray, rng: np.random.Generator, frequency: np.ndarray | None = None, *,
                exclude: bool = False, lead: int = 1, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """A random mask with the same number of True per layer (group), uniform within each
    layer by default; see matched_random for `frequency`, `exclude`, `lead` and `neighbours`.

    Args:
      mask: bool [L, ...].
      rng: generator.

    Returns:
      bool [L, ...].
    """
    return matched_random(mask, rng, frequency, neighbours=neighbours, exclude=exclude, lead=lead)[0]


def fires_less(set_frequency: float, random_frequency: np.ndarray) -> bool:
    """Whether the random draws (float [D] mean frequencies) fire on average below
    (1 - FREQUENCY_GAP) x the set's mean frequency: the frequency matching's warning."""
    rf = np.asarray(random_frequency, np.float64)
    return bool(np.isfinite(set_frequency) and rf.size and np.isfinite(rf).all()
                and rf.mean() < (1 - FREQUENCY_GAP) * set_frequency)


def stronger(set_magnitude: float, random_magnitude: np.ndarray) -> bool:
    """Whether a set's activation magnitude is above (1 + MAGNITUDE_GAP) x its firing-mass-matched draws'
    mean (float [D], or [D, L] per layer, summed): the magnitude warning's test, and the categories
    `magnitude_where="where_warned"` draws magnitude-matched sets for."""
    r = np.asarray(random_magnitude, np.float64)
    r = r.reshape(r.shape[0], -1).sum(1) if r.ndim > 1 else r
    return bool(np.isfinite(set_magnitude) and r.size and np.isfinite(r).all()
                and set_magnitude > (1 + MAGNITUDE_GAP) * r.mean())


def _check_firing_mass(firing_mass: Mapping[str, np.ndarray], shape: tuple[int, ...], name: str = "firing_mass",
                       what: str = "firing frequency", source: str = "Identification.category_mean") -> None:
    """Refuse a firing mass (or `name`: a unit's `what`) that does not fit the sets or is not finite and >= 0."""
    for cat, v in firing_mass.items():
        if v.shape != shape:
            raise ValueError(f"{name}[{cat!r}] has shape {v.shape}, the sets {shape}")
        if not (np.isfinite(v) & (v >= 0)).all():
            raise ValueError(f"{name}[{cat!r}]: every unit needs a finite {what} >= 0 "
                             f"(e.g. {source})")


def _firing(firing_mass: Mapping[str, np.ndarray], mask: np.ndarray, cat: str) -> tuple[list[float], np.ndarray]:
    """The firing mass of `mask` on every category's records ([C], NaN where none is given) and
    on `cat`'s per layer ([L])."""
    return ([firing_mass[c][mask].sum() if c in firing_mass else np.nan for c in CATEGORIES],
            mask_layer_mass(firing_mass[cat], mask))


def mass_fill(mass_in_order: np.ndarray, target: float, u: float) -> np.ndarray:
    """Which units, taken in the given order, drop on average exactly `target`.

    Every unit that still fits under the target is taken, in order (a random greedy fill:
    it ends at most one unit short); then the lightest unit left is added with probability
    (target - filled) / its mass, so that over `u` the expected mass is the target itself,
    neither more nor less. The closest prefix of a random order (the earlier rule) was
    biased: it cannot skip a busy unit that comes first, so a small target was overshot on
    average (on the fresh demo's tiny Mixtral MATH's 19 draws carried 0.226 by the unablated
    estimates against the set's 0.213, +0.010 of it in the layer where the set's expert
    carries 0.021 and one outside it 0.078; this rule: +0.004 on the same stream, +0.0001
    over 4000 draws).

    Args:
      mass_in_order: float [W] the candidate units' masses, in a random order.
      target: the mass to match.
      u: a uniform number in [0, 1): the rounding's draw.

    Returns:
      bool [W] the units taken: never none (a layer of the set always loses an expert, so
      when every unit outweighs the target the lightest is taken, and the mass is
      overshot); every unit when all of them fall short. Units of no mass are never
      taken for nothing.
    """
    m = np.asarray(mass_in_order, np.float64)
    take = np.zeros(m.size, bool)
    filled = 0.0
    for i, x in enumerate(m.tolist()):
        if 0.0 < x and filled + x <= target:
            take[i], filled = True, filled + x
    rest = np.flatnonzero(~take & (m > 0))
    if rest.size:
        j = rest[np.argmin(m[rest])]  # the lightest left (the first in the order among ties)
        take[j] = not take.any() or u * m[j] < target - filled
    elif not take.any():  # no unit has any mass
        take[0] = True
    return take


def mask_layer_mass(mass: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float [L]: per layer, the mass (float [L, ...]: [L, E] experts, [L, F] neurons, [L, E, G]
    expert neurons) of the units in `mask` (bool, the same shape)."""
    m = np.asarray(mass, np.float64) * mask
    return m.reshape(m.shape[0], -1).sum(1)


def mass_matched_random(mask: np.ndarray, mass: np.ndarray, rng: np.random.Generator,
                        target: np.ndarray | None = None) -> np.ndarray:
    """A random set outside `mask` removing, per layer, on average the mass `mask` removes.

    In every layer where the set has units, the units outside it (for expert neurons: of
    every expert of the layer) are put in a uniformly random order and filled in by
    `mass_fill`: each one that still fits under the set's mass is taken, then the lightest
    left with the probability that makes the expected mass the set's. A draw's mass in a
    layer is within one unit of the target, and over draws it is the target on average
    (unless every unit outside the set outweighs it: one is still taken; or all of them
    together fall short: all are taken). The draw holds as many units as that takes, more
    than the set where the set holds its layer's busiest.

    Args:
      mask: bool [L, ...] the tested set ([L, E] experts, [L, F] neurons, [L, E, G] expert neurons).
      mass: float, the mask's shape: each unit's mass: for experts its estimated routing mass
        (e.g. its mean softmax probability on the category's held-out tokens in the unablated
        model), for neurons its firing frequency on the category's records.
      rng: generator (draw order: layer, then one permutation of its free units and one
        uniform number for the rounding).
      target: float [L] the mass to reach per layer (e.g. what the set dropped, measured in
        its own pass); None: the set's own mass there.

    Returns:
      bool, the mask's shape, never holding a unit of `mask`.
    """
    rows = np.asarray(mask, bool).reshape(mask.shape[0], -1)
    m = np.asarray(mass, np.float64).reshape(rows.shape)
    target = (m * rows).sum(1) if target is None else np.asarray(target, np.float64).reshape(-1)
    out = np.zeros_like(rows)
    for g in np.flatnonzero(rows.any(1)):
        free = rng.permutation(np.flatnonzero(~rows[g]))
        u = rng.random()
        if free.size:
            out[g, free[mass_fill(m[g, free], float(target[g]), u)]] = True
    return out.reshape(mask.shape)


def _row(losses: Mapping[str, float], baseline: dict[str, float]) -> np.ndarray:
    losses = {normalize_category(k): float(v) for k, v in losses.items()}
    return np.array([losses.get(c, np.nan) - baseline.get(c, np.nan) for c in CATEGORIES])


def dropped_mass(loss_fn) -> float:
    """The routing mass the last call of `loss_fn` dropped (`last_dropped_mass`), NaN when it gives none."""
    v = getattr(loss_fn, "last_dropped_mass", None)
    return np.nan if v is None else float(v)


def baseline_expert_mass(loss_fn) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The unablated model's pass: ({category: mean loss}, {category: float [L, E]} each
    expert's routing mass on the category's held-out tokens), from one baseline call of
    `loss_fn` and its `last_expert_mass` (as `CategoryLoss` of kind "experts" reports it);
    the `baseline` and `expert_mass` of `ablation_matrix`.

    Raises:
      ValueError: `loss_fn` reports no per-expert mass.
    """
    return _baseline_measure(loss_fn, "last_expert_mass", "each expert's routing mass after a call "
                             "(`last_expert_mass`, as sparcom_jax.stats.losses.CategoryLoss of kind 'experts' does)")


def baseline_unit_firing(loss_fn) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The unablated model's pass: ({category: mean loss}, {category: float, the sets' shape:
    each unit's firing frequency on the category's held-out records}), from one baseline call
    of `loss_fn` and its `last_unit_firing` (`CategoryLoss` with `firing_scopes`, which
    `make_loss_fn(firing_scope=...)` gives); the `baseline` and `firing_mass` of `ablation_matrix`.

    Raises:
      ValueError: `loss_fn` counts no firing.
    """
    return _baseline_measure(loss_fn, "last_unit_firing", "each unit's firing in its baseline pass "
                             "(`last_unit_firing`, as sparcom_jax.stats.losses.make_loss_fn(firing_scope=...) "
                             "of kind 'neurons' or 'expert_neurons' does); or take the identification's firing "
                             "(firing_source='identification')")


def unit_magnitude(loss_fn) -> dict[str, np.ndarray] | None:
    """{category: each unit's activation magnitude} the last (baseline) call of `loss_fn` measured
    beside the firing (`last_unit_magnitude`, `CategoryLoss` with `firing_scopes`); None without it."""
    got = getattr(loss_fn, "last_unit_magnitude", None)
    return None if got is None else {normalize_category(k): np.asarray(v, np.float64) for k, v in got.items()}


def baseline_firing_magnitude(loss_fn) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """`baseline_unit_firing` with each category's `unit_magnitude` stacked behind its firing:
    ({category: mean loss}, {category: float [2, *the sets' shape]}), so that one shared
    baseline carries both (the pipeline's `_baseline_shared`).

    Raises:
      ValueError: `loss_fn` counts no firing, or measures no magnitude beside it.
    """
    losses, firing = baseline_unit_firing(loss_fn)
    magnitude = unit_magnitude(loss_fn)
    if magnitude is None or set(magnitude) != set(firing):
        raise ValueError("the activation magnitude needs a loss_fn that measures it beside the firing "
                         "(`last_unit_magnitude`, as sparcom_jax.stats.losses.make_loss_fn(firing_scope=...) does)")
    return losses, {c: np.stack([f, magnitude[c]]) for c, f in firing.items()}


def _baseline_measure(loss_fn, attr: str, what: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The baseline losses of one unablated call of `loss_fn` and its per-category `attr` after it."""
    losses = loss_fn(None)
    got = getattr(loss_fn, attr, None)
    if got is None:
        raise ValueError(f"the mass-matched control needs a loss_fn that reports {what}")
    return ({normalize_category(k): float(v) for k, v in losses.items()},
            {normalize_category(k): np.asarray(v, np.float64) for k, v in got.items()})


def category_mass(loss_fn) -> dict[str, float] | None:
    """{category: routing mass the last call of `loss_fn` dropped on its tokens}
    (`last_category_mass`), None when it gives none."""
    v = getattr(loss_fn, "last_category_mass", None)
    return None if v is None else {normalize_category(k): float(x) for k, x in v.items()}


def category_layer_mass(loss_fn, mask: np.ndarray | None) -> dict[str, np.ndarray] | None:
    """{category: float [L] the routing mass `mask` (bool [L, E]) dropped on the category's tokens
    in the last call of `loss_fn`, per layer}, from its `last_expert_mass` (each expert's
    probability in that pass); None when it gives none or `mask` is not an expert mask."""
    got = getattr(loss_fn, "last_expert_mass", None)
    if got is None or mask is None:
        return None
    m = np.asarray(mask, bool)
    out = {normalize_category(k): mask_layer_mass(v, m) for k, v in got.items() if np.shape(v) == m.shape}
    return out or None


def run_in_order(loss_fn: LossFn, masks: Sequence[np.ndarray | None]) -> list[PassResult]:
    """The default `MaskRunner`: `loss_fn` on each mask in turn, with the mass each call dropped."""
    return [(loss_fn(m), dropped_mass(loss_fn), category_mass(loss_fn), category_layer_mass(loss_fn, m))
            for m in masks]


def full_layers(expert_sets: Mapping[str, np.ndarray]) -> str:
    """Which categories' sets hold every expert of a layer, and which layers ("" when none).

    Such a set cannot be ablated: routing would have no expert left in those layers
    (`ablation_matrix` refuses it; the pipeline skips the expert check before any pass).

    Args:
      expert_sets: {category: bool [L, E]}.

    Returns:
      e.g. "code: its ISEs cover every expert of layer(s) [1]", one such part per category, "; "-joined.
    """
    full = {normalize_category(k): np.flatnonzero(np.asarray(v, bool).all(1)).tolist()
            for k, v in expert_sets.items()}
    return "; ".join(f"{c}: its ISEs cover every expert of layer(s) {ls}" for c, ls in full.items() if ls)


def ablation_matrix(
    category_sets: Mapping[str, np.ndarray],
    loss_fn: LossFn,
    *,
    n_random: int = 19,
    seed: int = 0,
    kind: str = "neurons",
    frequency: np.ndarray | None = None,
    neighbours: int = NEIGHBOURS,
    run: MaskRunner = run_in_order,
    expert_mass: Mapping[str, np.ndarray] | None = None,
    baseline: Mapping[str, float] | None = None,
    firing_mass: Mapping[str, np.ndarray] | None = None,
    mass_where: str = "always",
    firing_source: str | None = None,
    firing_magnitude: Mapping[str, np.ndarray] | None = None,
    magnitude_where: str | None = None,
) -> AblationResult:
    """Loss increase of every category when each category's set is switched off.

    Args:
      category_sets: {category: bool [L, F] (neurons), [L, E] (experts) or
        [L, E, G] (expert neurons)}; missing categories give NaN rows.
      loss_fn: mask (True = off) or None -> {category: mean loss}; may expose
        `last_dropped_mass` after each call, and `coverage` (see AblationResult).
      n_random: random control draws per category (default 19: the smallest
        Monte-Carlo p-value is 1 / (1 + n_random), 0.05 at 19).
      seed: RNG seed (draw order: category, then draw, then group, then unit).
      kind: "neurons", "experts" or "expert_neurons" (matched per layer, per
        layer, per (layer, expert)); for experts a layer may not lose all its
        experts, since routing then has nothing left.
      frequency: float, the mask's shape: each unit's (finite) activation frequency in the
        ablated model (e.g. `Identification.unit_frequency()`); each unit of a set
        is then replaced by a unit of similar frequency (see `neighbours`). None
        matches counts per group only.
      neighbours: each unit of a set is replaced by one drawn among the
        `neighbours` free units of its group nearest to it in frequency (see
        `matched_random`).
      run: evaluates the masks, all of a round drawn first (baseline None unless `baseline`
        is given, then per category its set and its draws; with `expert_mass`, a second
        call with the mass-matched draws, in category order): `run_in_order` by default;
        the pipeline passes one that shares them among processes. The draws depend only
        on the seed and, for the mass-matched ones, on the first round's masses, so the
        result is the same whichever runs them.
      expert_mass: experts only: {category: float [L, E] each expert's routing mass on
        the category's held-out tokens} (`baseline_expert_mass`); when given, also
        `n_random` mass-matched sets per category (`mass_matched_random`, on their own
        random stream): per layer, they reach the mass the set dropped on the category's
        tokens as measured in the set's own pass (`loss_fn.last_expert_mass`, which the
        loss_fn must then report), the candidates valued at these estimates; a category
        without an entry gets NaN.
      baseline: {category: mean loss} of the unablated model when already measured (the
        pass `baseline_expert_mass` made); None: measured as the first pass.
      firing_mass: neurons and expert neurons only: {category: float, the sets' shape: each
        unit's firing frequency on the category's records} (on its held-out records, from the
        unablated pass, `baseline_unit_firing`; or `Identification.category_mean`, from the
        identification counts: say which in `firing_source`); when given, also `n_random` firing-mass-matched sets
        per category (`mass_matched_random`, on their own random stream): random units outside
        the set whose summed frequency on the category's records is, per layer, on average the
        set's (within one unit in each draw); for expert neurons from any expert of the layer.
        They need no pass of their own to be drawn, so they run in the same round as the
        other masks. A category without an entry gets NaN.
      mass_where: with `firing_mass`: "always" (every category with a set) or "where_warned"
        (only the categories whose frequency-matched draws fire on average below
        (1 - FREQUENCY_GAP) x the set, the `matching_warnings` test, known before any pass;
        the others get NaN).
      firing_source: with `firing_mass`, the records it was counted on, recorded in the result
        (`AblationResult.mass_source`): "held_out" (the loss's own records, `baseline_unit_firing`)
        or "identification" (`Identification.category_mean`); None: not said.
      firing_magnitude: with `firing_mass`, {category: float, the sets' shape: each unit's
        activation magnitude on the records the firing was counted on, on the same tokens}
        (`CategoryLoss.last_unit_magnitude`, from the pass that counted the firing): summed over
        each set and each firing-mass-matched draw, per layer (`set_layer_magnitude`,
        `mass_random_layer_magnitude`). A diagnostic, not a matching: the draws stay matched on
        firing. None: not measured.
      magnitude_where: with `firing_magnitude`, also `n_random` magnitude-matched sets per category
        where the firing-mass-matched control runs (`mass_matched_random` valued at each unit's
        magnitude, on their own random stream `[seed, 3]`: the other draws stay the same): random
        units outside the set carrying, per layer, on average the set's activation magnitude
        (within one unit in each draw). "always" (every such category) or "where_warned" (those whose
        set carries more than (1 + MAGNITUDE_GAP) x its firing-mass-matched draws' mean, `stronger`,
        known before any pass); None: not drawn. They run in the same round as the others.

    Returns:
      An AblationResult. Random sets are always drawn outside the tested set
      (AblationResult.in_set counts the exceptions). An empty set ablates
      nothing: its rows are 0 without calling the model.
    """
    if kind not in KIND_LEAD:
        raise ValueError(f"kind must be one of {tuple(KIND_LEAD)}, got {kind!r}")
    mass_matched = expert_mass is not None or firing_mass is not None
    if expert_mass is not None and kind != "experts":
        raise ValueError(f"expert_mass matches routing mass, which only experts have (kind {kind!r}); "
                         "neurons take firing_mass")
    if firing_mass is not None and kind == "experts":
        raise ValueError("firing_mass matches neurons' firing; experts take expert_mass (routing mass)")
    if firing_magnitude is not None and firing_mass is None:
        raise ValueError("firing_magnitude is measured beside the firing-mass-matched control: give firing_mass too")
    if magnitude_where not in (None, *MASS_WHERE) or (magnitude_where is not None and firing_magnitude is None):
        raise ValueError(f"magnitude_where must be one of {MASS_WHERE} (or None), and needs firing_magnitude (each "
                         f"unit's activation magnitude, CategoryLoss.last_unit_magnitude); got {magnitude_where!r}")
    routing = expert_mass is not None  # measured in the passes (firing mass: from the counts)
    if firing_source not in (None, *FIRING_SOURCES):
        raise ValueError(f"firing_source must be one of {FIRING_SOURCES} (or None), got {firing_source!r}")
    if mass_where not in MASS_WHERE or (mass_where != "always" and firing_mass is None):
        raise ValueError(f"mass_where must be one of {MASS_WHERE}, and 'where_warned' needs firing_mass; "
                         f"got {mass_where!r}")
    lead = KIND_LEAD[kind]
    sets = {normalize_category(k): np.asarray(v, dtype=bool) for k, v in category_sets.items()}
    if kind == "experts" and (full := full_layers(sets)):
        raise ValueError(full)
    if frequency is not None:
        shapes = {v.shape for v in sets.values()}
        if shapes and shapes != {np.shape(frequency)}:
            raise ValueError(f"frequency has shape {np.shape(frequency)}, the sets {sorted(shapes)}")
    freq64 = None if frequency is None else np.asarray(frequency, np.float64)  # (once, not per draw)
    order = None if frequency is None else frequency_order(freq64, lead)
    isn = np.full((C, C), np.nan)
    draws = np.full((n_random, C, C), np.nan)
    sizes = np.zeros(C, np.int64)
    dropped = np.full(C, np.nan)
    rdropped = np.full((n_random, C), np.nan)
    in_set = np.zeros((n_random, C), np.int64)
    # The frequency match each draw achieved, and the closest the data allow.
    set_freq = None if frequency is None else np.full(C, np.nan)
    close_freq = None if frequency is None else np.full(C, np.nan)
    rand_freq = None if frequency is None else np.full((n_random, C), np.nan)
    above = None if frequency is None else np.zeros(C, np.int64)
    rng = np.random.default_rng(seed)
    # Its own stream: the draws stay those of the seed whether or not it is measured.
    closest_rng = np.random.default_rng([seed, 1])
    expert_mass = {normalize_category(k): np.asarray(v, np.float64) for k, v in (expert_mass or {}).items()}
    mass_draws = mass_sizes = mass_mass = set_mass = layer_mass = layer_est = draw_layer = draw_est = None
    set_cross = draw_cross = None
    if mass_matched:
        mass_draws = np.full((n_random, C, C), np.nan)
        mass_sizes = np.zeros((n_random, C), np.int64)
        mass_mass = np.full((n_random, C), np.nan)
        set_mass = np.full(C, np.nan)
        n_layers = next((v.shape[0] for v in sets.values()), 0)
        layer_mass, layer_est = np.full((C, n_layers), np.nan), np.full((C, n_layers), np.nan)
        draw_layer, draw_est = np.full((n_random, C, n_layers), np.nan), np.full((n_random, C, n_layers), np.nan)
        set_cross, draw_cross = np.full((C, C), np.nan), np.full((n_random, C, C), np.nan)
    set_mag = None if firing_magnitude is None else np.full((C, n_layers), np.nan)
    draw_mag = None if firing_magnitude is None else np.full((n_random, C, n_layers), np.nan)
    # The magnitude-matched draws: losses, units, and per layer the magnitude and firing they carry.
    mag_draws = None if magnitude_where is None else np.full((n_random, C, C), np.nan)
    mag_sizes = None if magnitude_where is None else np.zeros((n_random, C), np.int64)
    mag_layer = None if magnitude_where is None else np.full((n_random, C, n_layers), np.nan)
    mag_firing = None if magnitude_where is None else np.full((n_random, C, n_layers), np.nan)
    mag_rng = np.random.default_rng([seed, 3])  # (its own stream: the other draws stay the seed's)
    # Its own stream too: the frequency-matched draws stay the seed's with or without it.
    mass_rng = np.random.default_rng([seed, 2])
    firing_mass = None if firing_mass is None else {normalize_category(k): np.asarray(v, np.float64)
                                                    for k, v in firing_mass.items()}
    firing_magnitude = None if firing_magnitude is None else {normalize_category(k): np.asarray(v, np.float64)
                                                              for k, v in firing_magnitude.items()}
    if firing_mass is not None and sets:
        _check_firing_mass(firing_mass, next(iter(sets.values())).shape)
        _check_firing_mass(firing_magnitude or {}, next(iter(sets.values())).shape, "firing_magnitude",
                           "activation magnitude", "CategoryLoss.last_unit_magnitude")
    masks: list[np.ndarray | None] = [None] if baseline is None else []  # the baseline first
    # (ablated category, "set" / "random" / "mass", draw) of the masks after the baseline
    slots: list[tuple[int, str, int]] = []
    for a, cat in enumerate(CATEGORIES):
        if cat not in sets:
            continue
        mask = sets[cat]
        sizes[a] = mask.sum()
        if not sizes[a]:
            isn[a] = draws[:, a] = 0.0
            dropped[a] = rdropped[:, a] = 0.0
            if mass_matched:
                mass_draws[:, a] = mass_mass[:, a] = set_mass[a] = layer_mass[a] = layer_est[a] = 0.0
                draw_layer[:, a] = draw_est[:, a] = set_cross[a] = draw_cross[:, a] = 0.0
            if set_mag is not None:
                set_mag[a] = draw_mag[:, a] = 0.0
            if mag_draws is not None:
                mag_draws[:, a] = mag_layer[:, a] = mag_firing[:, a] = 0.0
            continue
        masks.append(mask)
        slots.append((a, "set", 0))
        if frequency is not None:
            set_freq[a] = freq64[mask].mean()
            close_freq[a] = freq64[matched_random(mask, closest_rng, freq64, neighbours=1, lead=lead,
                                                     order=order)[0]].mean()
            above[a] = above_all_others(mask, freq64, lead)
        for d in range(n_random):
            rmask, in_set[d, a] = matched_random(mask, rng, freq64, neighbours=neighbours, exclude=True,
                                                   lead=lead, order=order)
            if frequency is not None:
                rand_freq[d, a] = freq64[rmask].mean()
            masks.append(rmask)
            slots.append((a, "random", d))
        if firing_mass is None or cat not in firing_mass or not n_random or (
                mass_where == "where_warned" and not (frequency is not None
                                                      and fires_less(set_freq[a], rand_freq[:, a]))):
            continue
        # Firing mass: the identification counts give every unit's, so the draws need no pass first.
        set_cross[a], layer_mass[a] = _firing(firing_mass, mask, cat)
        set_mass[a], layer_est[a] = set_cross[a, a], layer_mass[a]
        magnitude = None if firing_magnitude is None else firing_magnitude.get(cat)
        if magnitude is not None:
            set_mag[a] = mask_layer_mass(magnitude, mask)
        for d in range(n_random):
            rmask = mass_matched_random(mask, firing_mass[cat], mass_rng)
            draw_cross[d, a], draw_layer[d, a] = _firing(firing_mass, rmask, cat)
            if magnitude is not None:
                draw_mag[d, a] = mask_layer_mass(magnitude, rmask)
            mass_sizes[d, a], mass_mass[d, a], draw_est[d, a] = rmask.sum(), draw_cross[d, a, a], draw_layer[d, a]
            masks.append(rmask)
            slots.append((a, "mass", d))
        if magnitude is None or magnitude_where is None or (
                magnitude_where == "where_warned" and not stronger(set_mag[a].sum(), draw_mag[:, a])):
            continue
        # Matched on how strongly the units fire, by the same fill valued at each unit's magnitude.
        for d in range(n_random):
            rmask = mass_matched_random(mask, magnitude, mag_rng)
            mag_layer[d, a], mag_firing[d, a] = mask_layer_mass(magnitude, rmask), mask_layer_mass(firing_mass[cat], rmask)
            mag_sizes[d, a] = rmask.sum()
            masks.append(rmask)
            slots.append((a, "magnitude", d))
    results = run(loss_fn, masks)
    if baseline is None:
        (baseline, *_), *results = results
    # Second round: removing a set's early experts can move the later layers' routing onto
    # its later experts, so the draws match the mass the set dropped in its own pass, per
    # layer, not its unablated estimate. A category none of whose held-out tokens is scored
    # has no mass to match: NaN.
    masks, slots2 = [], []
    for (a, which, _), (_, _, _, by_layer) in zip(slots, results, strict=True):
        cat = CATEGORIES[a]
        if which != "set" or not n_random or cat not in expert_mass:  # (firing mass: drawn in round one)
            continue
        if by_layer is None or cat not in by_layer:
            raise ValueError("the mass-matched control needs a loss_fn that reports each expert's routing mass "
                             "after an ablated call (`last_expert_mass`, as sparcom_jax.stats.losses.CategoryLoss "
                             f"of kind 'experts' does): none for {cat}'s set")
        layer_mass[a], layer_est[a] = by_layer[cat], mask_layer_mass(expert_mass[cat], sets[cat])
        for d in range(n_random):
            rmask = mass_matched_random(sets[cat], expert_mass[cat], mass_rng, target=layer_mass[a])
            mass_sizes[d, a], draw_est[d, a] = rmask.sum(), mask_layer_mass(expert_mass[cat], rmask)
            masks.append(rmask)
            slots2.append((a, "mass", d))
    if masks:
        results += run(loss_fn, masks)
    baseline = {normalize_category(k): float(v) for k, v in baseline.items()}
    for (a, which, d), (losses, mass, by_cat, by_layer) in zip(slots + slots2, results, strict=True):
        on_tokens = np.array([np.nan if by_cat is None else by_cat.get(c, np.nan) for c in CATEGORIES])
        own = on_tokens[a]  # on a's own tokens
        if which == "set":
            isn[a], dropped[a] = _row(losses, baseline), mass
            if routing:  # (routing mass: measured in the pass; firing mass: counted before)
                set_mass[a], set_cross[a] = own, on_tokens
        elif which == "random":
            draws[d, a], rdropped[d, a] = _row(losses, baseline), mass
        elif which == "magnitude":
            mag_draws[d, a] = _row(losses, baseline)
        else:
            mass_draws[d, a] = _row(losses, baseline)
            if routing:
                mass_mass[d, a], draw_cross[d, a] = own, on_tokens
                draw_layer[d, a] = (by_layer or {}).get(CATEGORIES[a], np.nan)  # (none: a loss_fn without it)
    rand = draws.mean(0) if n_random else np.full((C, C), np.nan)
    has_mass = np.isfinite(dropped[sizes > 0]).any()
    return AblationResult(
        kind=kind, baseline=baseline, isn=isn, random=rand, random_draws=draws, set_sizes=sizes,
        n_random=n_random, seed=seed, dropped_mass=dropped if has_mass else None,
        random_dropped_mass=rdropped if has_mass else None, in_set=in_set,
        matching={"group": "layer, expert" if lead == 2 else "layer",
                  "nearest_frequency": None if frequency is None else neighbours,
                  "exclude_tested_set": True},
        set_frequency=set_freq, random_frequency=rand_freq, coverage=getattr(loss_fn, "coverage", None),
        closest_frequency=close_freq, above_others=above, mass_random_draws=mass_draws,
        set_category_mass=set_mass, mass_random_mass=mass_mass, mass_random_sizes=mass_sizes,
        set_layer_mass=layer_mass, set_layer_estimate=layer_est, mass_random_layer_mass=draw_layer,
        mass_random_layer_estimate=draw_est, set_mass_matrix=set_cross, mass_random_mass_matrix=draw_cross,
        mass_where=mass_where if mass_matched else None,
        mass_source=("held_out" if routing else firing_source) if mass_matched else None,
        firing_records=_firing_records(loss_fn) if firing_mass is not None and firing_source == "held_out" else None,
        set_layer_magnitude=set_mag, mass_random_layer_magnitude=draw_mag, magnitude_random_draws=mag_draws,
        magnitude_random_sizes=mag_sizes, magnitude_random_layer_magnitude=mag_layer,
        magnitude_random_layer_firing=mag_firing, magnitude_where=magnitude_where)


def _firing_records(loss_fn) -> dict[str, int] | None:
    """{category: held-out records its firing was counted on} (`loss_fn.firing_records`), None without it."""
    got = getattr(loss_fn, "firing_records", None)
    return None if got is None else {normalize_category(k): int(v) for k, v in got.items()}


def ablate_identification(ident, loss_fn: LossFn, *, firing_matched: str | None = None,
                          firing_source: str = "held_out", magnitude_matched: str | None = None,
                          **kw) -> AblationResult:
    """ablation_matrix on an identification's category sets, random sets matched on the
    units' mean frequency over all instructions (kind from the count field).

    Args:
      ident: the ablated model's identification, or one section of its analysis
        (`analysis["isn"]`, whose `.ident` it is).
      loss_fn: see ablation_matrix.
      firing_matched: neurons and expert neurons: "always" or "where_warned" adds the
        firing-mass-matched control (the `mass_where` of ablation_matrix). None: not drawn.
      firing_source: where a unit's firing (that control's mass) is counted: "held_out"
        (default): on the category's held-out records, the ones the loss is measured on, in
        the unablated pass (`baseline_unit_firing`: the loss_fn must count it, as
        `make_loss_fn(firing_scope=...)` does, on the scope the sets were identified on; that
        pass is the check's baseline); "identification": on the records the sets were
        identified from (`category_mean`), which the sets were chosen for firing often on.
        A `firing_mass` (and `baseline`) in `kw` already measured is taken as it is.
        With held-out firing counted here, the units' activation magnitude the same pass
        measured (`unit_magnitude`) is summed beside it (`AblationResult.magnitude`).
      magnitude_matched: with `firing_matched` and held-out firing: "always" or "where_warned" adds the
        magnitude-matched control (the `magnitude_where` of ablation_matrix); None: not drawn.
      **kw: n_random, seed, neighbours, run, expert_mass, baseline, firing_mass, firing_magnitude
        (see ablation_matrix).

    Raises:
      TypeError: a whole ModelAnalysis (which section to ablate is the caller's choice), or
        anything else that is not an identification, naming the sections to pick from.
      ValueError: an unknown `firing_source`, or "held_out" with a loss_fn that counts no firing.
    """
    from sparcom_jax.analysis.study import FieldAnalysis, ModelAnalysis  # study imports this module

    if isinstance(ident, FieldAnalysis):
        ident = ident.ident
    if not isinstance(ident, Identification):
        sections = f" ({', '.join(map(repr, ident.fields))})" if isinstance(ident, ModelAnalysis) else ""
        raise TypeError(f"ablate_identification ablates one section's sets: pass analysis[section].ident "
                        f"for one of the analysis' sections{sections}, e.g. analysis['isn'].ident; got "
                        f"{type(ident).__name__}")
    if firing_source not in FIRING_SOURCES:
        raise ValueError(f"firing_source must be one of {FIRING_SOURCES}, got {firing_source!r}")
    if firing_matched is not None:
        if kw.get("firing_mass") is None and firing_source == "identification":
            kw["firing_mass"] = by_category(ident.category_mean)
        elif kw.get("firing_mass") is None:  # the baseline pass counts it, and the magnitude beside it
            kw["baseline"], kw["firing_mass"] = baseline_unit_firing(loss_fn)
            kw.setdefault("firing_magnitude", unit_magnitude(loss_fn))
        kw.update(mass_where=firing_matched, firing_source=firing_source)
        if magnitude_matched is not None:
            if kw.get("firing_magnitude") is None:
                raise ValueError("magnitude_matched needs each unit's activation magnitude, measured beside the "
                                 "held-out firing (firing_source='held_out', a loss_fn reporting "
                                 "last_unit_magnitude, or firing_magnitude given)")
            kw["magnitude_where"] = magnitude_matched
    elif magnitude_matched is not None:
        raise ValueError("magnitude_matched runs beside the firing-mass-matched control: give firing_matched too")
    res = ablation_matrix(ident.sets(), loss_fn, kind=FIELD_KIND[ident.field],
                          frequency=ident.unit_frequency(), **kw)
    if firing_matched is not None and firing_source == "held_out":
        _identification_estimate(res, ident)
    return res


def _identification_estimate(res: AblationResult, ident: Identification) -> None:
    """Beside the held-out firing the draws matched, each set's firing per layer on its category's
    identification records (`set_layer_estimate`, where the control ran): what the counts the set
    was chosen from predicted, so that the gap shows how much less (regression to the mean) or
    more the set fires on new records."""
    for a in range(C):
        if np.isfinite(res.set_layer_mass[a]).all():
            res.set_layer_estimate[a] = mask_layer_mass(ident.category_mean[a], ident.category_sets[a])
