"""Write the report directory: summary.json, CSV tables, PNG figures, index.html.

    out/
      summary.json           everything (see docs/analysis.md)
      tables/*.csv           one table per file, "# ..." provenance lines first
      figures/*.png          the figures shown in index.html
      sets/<model>_<section>.csv|json   ISN / ISE lists (when analyses are given)
      index.html             self-contained page (figures inlined)

Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from sparcom_jax.analysis.ablate import (FIRING_SOURCES, FREQUENCY_GAP, MAGNITUDE_GAP, MASS_TOLERANCE,
                                         MIN_SCORED_FRACTION, MIN_SCORED_RECORDS)
from sparcom_jax.analysis.compare import SET_KEYS
from sparcom_jax.analysis.study import ModelAnalysis
from sparcom_jax.analysis.uncertainty import one_unit_note
from sparcom_jax.categories import CATEGORIES, SHORT_NAMES
from sparcom_jax.fingerprint import environment_line
from sparcom_jax.report.export import export_sets
from sparcom_jax.report.html import FigureBlock, TableBlock, TextBlock, render_html
from sparcom_jax.report.io import atomic_write, write_csv, write_json
from sparcom_jax.report.tables import (
    ABLATION_CORNER, ABLATION_HEADER, DOMINANCE_HEADER, LENGTH_HEADER, TOP_HEADER, ablation_rows, all_tables,
    boot_values, dominance_rows, interval, length_rows, magnitude_matched_header, magnitude_matched_rows, mass_header,
    mass_rows, matrix_table, precision_table,
    measured_comparison, safe_name, top_instruction_rows, unmeasured, unmeasured_compared,
)

SECTION_TITLES = {
    "isn": "Instruction-specific neurons (ISNs)",
    "ise": "Instruction-specific experts (ISEs)",
    "expert_neurons": "Instruction-specific expert neurons (MoE)",
}
UNIT_WORD = {"isn": "neurons", "ise": "experts", "expert_neurons": "expert neurons"}
# How the report names each bootstrapped figure; per-category figures list their categories,
# matrix figures their number of cells.
FIGURE_NAMES = {
    "per_category_count": "|S(c)| of", "unique": "|U(c)| of", "general": "the general count",
    "general_share": "the general share", "overlap_jaccard": "category-overlap (Jaccard) cells",
    "overlap_coefficient": "overlap-coefficient cells", "instruction_overlap": "instruction-level overlap cells",
    "diagonal_dominance": "the overall diagonal dominance", "per_category_dominance": "the diagonal dominance of",
}

CAPTIONS = {
    "overlap": "Category-level overlap: cell (a, b) is the Jaccard index |S(a)∩S(b)| / |S(a)∪S(b)| "
               "of the two categories' {units}, one panel per model. Bright off-diagonal cells mean two "
               "kinds of instruction share {units}; the diagonal is 1 for every non-empty set, and a blank "
               "cell is undefined (both sets empty). Overlap shows which {units} the categories select "
               "together, not that a category needs them (the causal check asks that).",
    "instruction_overlap": "Instruction-level overlap: cell (a, b) is the mean Jaccard of S(I), S(I') over "
                           "instructions I in a and I' in b (self-pairs excluded on the diagonal). A "
                           "diagonal brighter than its row means instructions of the same type share more "
                           "{units} than instructions of different types.",
    "instruction_matrix": "Jaccard of every pair of instructions, ordered by category (white lines separate "
                          "categories; colour scale clipped to the off-diagonal range). Bright diagonal "
                          "blocks mean same-type instructions use the same {units}.",
    "layers": "Number of {units} of each category per layer (0-based), one line per model. Dashed lines "
              "mark where the three phases (early, middle, late) start for each model, found by the "
              "best three-step fit of the profile. The best of many fits explains much of any profile, a "
              "flat noisy one too: the phases table gives explained_p, how often the layers in random "
              "order fit as well; a small value says the profile changes along depth, not that it has "
              "three phases.",
    "generality": "Left: set size |S(c)| (light) and its unique part |U(c)| (dark). Middle: the share "
                  "of each set that no other category has. Right: in how many categories each selected "
                  "unit appears; the bar at 6 is the general set (count and share of the union in the "
                  "legend).",
    "comparison": "How each category's set changed from {before} to {after}: the left bar is the set "
                  "before (retained + lost), the right bar the set after (retained + gained); J is the "
                  "Jaccard of before and after. Where both models were bootstrapped with the same "
                  "instruction draws, the table gives the Jaccard's paired interval: how much it varies "
                  "with the instructions drawn. A Jaccard below 1 says the two models select different "
                  "units on these instructions; it does not say how far apart two models with the same "
                  "weights would come out (the same-template and precision controls bear on that).",
    "ise_frequency": "Mean routing frequency of every (layer, expert) pair over each category's "
                     "instructions (model {model}). Rows are layers, columns experts; bright cells are "
                     "experts the category routes to often.",
    "expert_neurons_count": "Number of instruction-specific expert neurons in every (layer, expert) "
                            "pair per category (model {model}).",
    "series": "The same figures along the checkpoint series: set sizes, uniqueness, Jaccard with the "
              "first and the previous checkpoint, generality and the instruction-level diagonal "
              "dominance (mean diagonal minus mean off-diagonal); the shaded bands are paired bootstrap "
              "intervals where the checkpoints were resampled with the same draws.",
    "ablation": "Causal check ({kind}): cell (a, b) is the increase of the mean next-token loss (nats per "
                "response token) on category b's held-out reference responses when category a's set is "
                "switched off.",
    "ablation_mass": (
        "Mass-matched control ({n} draws per category; the table above): random experts outside the set, "
        "taken in each layer in random order while their mass on the category's own held-out tokens (each "
        "expert's in the unablated model) still fits under what the set's experts dropped in that layer in "
        "the set's own pass, then the lightest one left with the probability that makes the expected mass "
        "the set's (at least one per layer), so the draws neither over- nor undershoot on average. It "
        "answers what the frequency-matched draws cannot "
        "where the set holds its layers' busiest experts: does removing the set hurt more than removing as "
        "much routing mass elsewhere? set_mass_own_tokens and random_mass_own_tokens_mean (min, max) are the "
        "masses actually dropped (mean per token and layer; removing a set's early experts moves the later "
        "routing, so the set drops more than the unablated model predicts, which is why the draws aim at its "
        "measured mass); random_experts_mean is the draws' size: they usually "
        "remove more, less busy experts than the set, so a set that still hurts more concentrates its effect "
        "on fewer experts; one that does not is no more harmful than the mass it removes. "
        "random_mass_error_mean and random_mass_error_abs_mean are a draw's mass minus the set's, mean "
        "signed and absolute over draws: a mean beyond {tol:.0%} of the set's mass is flagged under the table "
        "(the control is then harsher or milder than the set). The mass is "
        "matched on average over tokens, not token by token, and only on the category's own tokens: the "
        "other columns' tokens lose other masses (tables/ablation_{kind}_mass_matched_set_mass_matrix.csv "
        "and _random_mass_matrix_mean.csv, rows ablated, columns the tokens it was dropped on), more by the "
        "draws than by the set where the set's experts are specific to its category, less where the other "
        "category uses them too: an off-diagonal cell of the mass-matched excess mixes the set's effect "
        "with that mass difference, and only a cell whose sign goes against it says more."),
    "ablation_mass_layers": (
        " set_mass_own_tokens_estimate is the set's mass as the unablated model estimates it; its gap to "
        "set_mass_own_tokens is the later layers' routing moving onto (or off) the set's own experts once its "
        "earlier ones are removed, shown per layer in tables/ablation_{kind}_mass_matched_per_layer.csv "
        "(set_mass_estimate, set_mass_measured and their shift; beside them the draws' mass there, "
        "random_mass_mean, and its mean signed and absolute error against the set's; each layer's mass is "
        "divided by the number of layers, so a category's layers sum to its total)."),
    "ablation_firing_mass": (
        "Firing-mass-matched control ({n} draws per category; the table above): random {units} outside the "
        "set, taken in each layer (from all its experts, for expert neurons) in random order while their firing on "
        "the category's own records still fits under the set's there, then the lightest one left with the "
        "probability that makes the expected mass the set's, so the draws neither over- nor undershoot on "
        "average. A unit's mass is its firing frequency on the category's {records}, so set_mass_own_tokens is "
        "the expected number of the set's units that fire per token of the category, and "
        "random_mass_own_tokens_mean (min, max) the draws'. It answers "
        "what the frequency-matched draws cannot where the set holds its layers' busiest units: does "
        "removing the set hurt more than removing as much firing elsewhere in the same layers? "
        "random_{kind}_mean is the draws' size: they hold more, less busy units than the set, so a set that "
        "still hurts more concentrates its effect on fewer units; one that does not is no more harmful than "
        "the firing it removes. random_mass_error_mean and _abs_mean are a draw's mass minus the set's "
        "(mean signed and absolute; beyond {tol:.0%} of the set's mass is flagged under the table). {source}"
        "It is matched on the category's own "
        "records only (tables/ablation_{kind}_mass_matched_set_mass_matrix.csv and "
        "_random_mass_matrix_mean.csv give every category's), so an off-diagonal cell mixes the set's effect "
        "with a difference of firing on the other category's records."),
    "ablation_firing_held_out": (
        "The firing is counted in the unablated pass on the held-out records the loss is measured on, on the "
        "token scope the sets were identified on (ablation.neuron_mass_source: held_out), so the set and its "
        "draws are matched where they are scored. set_mass_own_tokens_estimate is the set's firing on the "
        "identification records it was chosen from (per layer in "
        "tables/ablation_{kind}_mass_matched_per_layer.csv, set_mass_estimate against set_mass_measured): a set "
        "chosen for firing often there usually fires less on new records (regression to the mean), by the "
        "shift shown. held_out_firing_records is how many of the category's held-out records have a token in "
        "that scope, the records its firing, the draws' target, rests on: fewer than {few} or under "
        "{share:.0%} of its held-out records (the loss coverage's thresholds) is flagged under the table, "
        "that target being noisy. "),
    "ablation_firing_identification": (
        "The firing is the identification counts' (ablation.neuron_mass_source: identification), not measured "
        "on the held-out records the loss uses: the sets were chosen for firing often there, so on new "
        "records they may fire less than counted, which makes this control harsher than the set by an "
        "amount this run does not measure. "),
    "ablation_firing_magnitude": (
        " set_magnitude_own_records is the activation the set's {units} carry on the category's held-out "
        "records, counted in the same unablated pass as their firing: each unit's activation summed over the "
        "tokens where it fires (A > 0) in that scope, per token of a record, averaged over the records and "
        "summed over the set; random_magnitude_mean is the draws' (mean over draws), magnitude_ratio the set's "
        "over it (per layer in tables/ablation_{kind}_mass_matched_per_layer.csv, set_magnitude and "
        "random_magnitude_mean). The draws are matched on how often their units fire, not on how strongly: a "
        "ratio above 1 + {gap:.0%} is flagged under the table, switching the set off then removing more "
        "activation than switching off the draws, so part of its excess over them can be that magnitude "
        "rather than what the units are specific to. A ratio near 1 removes that explanation, but does not "
        "show specificity: what a unit's activation does downstream also depends on its up and down "
        "projection weights, which this does not measure, and switching it off also removes its negative "
        "activations (SiLU, GELU) and its activations outside the counted scope (e.g. on the response "
        "tokens), which are not summed here."),
    "ablation_firing_no_magnitude": (
        " The activation magnitude the set and its draws carry was not measured for this result (it is "
        "counted beside the held-out firing, ablation.neuron_mass_source: held_out; results made before it "
        "was kept do not have it): whether the set's units fire more strongly than the draws' is not known "
        "here; sparcom ablate --overwrite measures it."),
    "ablation_magnitude_matched": (
        "Magnitude-matched control ({n} draws per category; the table above): random {units} outside the set, "
        "filled in each layer by the same rule as the firing-mass-matched draws but each unit valued at its "
        "activation magnitude on the category's held-out records (its positive activation per token, counted in "
        "the unablated pass beside its firing), so the draws carry on average the set's magnitude, "
        "set_magnitude_own_records against random_magnitude_mean (a draw's error, mean signed and absolute, "
        "beyond {tol:.0%} of the set's is flagged under the table). It shows whether removing the set hurts its "
        "category more than removing as much activation elsewhere in the same layers, which answers the "
        "objection that the set matters because its units fire strongly; it cannot show that the excess is "
        "specific to the category, nor match how often the units fire: matched in magnitude, the draws fire "
        "random_firing_ratio times as often as the set (random_firing_mean against set_firing_own_records; "
        "above 1, more, weaker units), so a set that beats both this control and the firing-mass-matched one "
        "hurts more than removing as much firing and as much activation, each alone; the up and down "
        "projection weights that carry a unit's activation downstream, and its negative activations, are "
        "still not matched.{where}"),
    "ablation_magnitude_where": (
        " Drawn only for the categories whose set carries more than 1 + {gap:.0%} times its firing-mass-matched "
        "draws' magnitude (ablation.neuron_magnitude_matched: where_warned); the other rows are empty."),
    "ablation_no_magnitude_matched": (
        " No magnitude-matched control was run for this result (ablation.neuron_magnitude_matched: never, "
        "no held-out firing to measure the magnitude beside, or a result made before it existed): whether the "
        "set hurts more than removing as much activation is not tested here."),
    "ablation_firing_where": (
        " Drawn only for the categories whose frequency-matched draws fire on average more than {gap:.0%} "
        "less often than the set (ablation.neuron_mass_matched: where_warned, the categories a matching warning names); "
        "the other rows are empty."),
    "ablation_controls": " Left: the instruction-specific set; middle: random sets matched to it "
                         "({matching}; mean of {n} draws); right: their difference. A red diagonal on the right "
                         "means each category's set hurts its own category more than removing as many comparable "
                         "units does, in this model and on these responses; the colours are not a test: read them "
                         "with the spread over draws, random_ge_fraction_own and p_own in the table below.",
    "size_vs_length": "Instruction set size |S(I)| against the number of counted tokens T(I), one point "
                      "per instruction, coloured by category. Frequencies of a T-token prompt take only "
                      "T + 1 values, so with ties kept at the top-eps cut short prompts can get larger "
                      "sets; a rising or falling cloud means set sizes (and the Jaccards built on them) "
                      "follow prompt length, not only the kind of instruction.",
}

SAME_TEMPLATE_TEXT = (
    "Same-template control: the tuned model counted under the base model's template, compared with "
    "the base. Both sides then see identical prompts, so this comparison holds only what the weights "
    "changed. Read it against the main comparison above: where the control retains about as much "
    "(similar Jaccard, similar gained/lost), the main result is a weight effect; where the main "
    "comparison gains or loses many more units than the control, that extra part comes from the "
    "prompt format, not from fine-tuning.")


def _bootstrap_text(s: dict) -> str:
    """The diagonal's headline with its interval and test, and what the uncertainty rests on."""
    perm = s.get("permutation") or {}
    b = s.get("bootstrap")
    parts = []
    if s.get("diagonal_dominance") is not None:
        txt = f"Instruction-level diagonal dominance: {s['diagonal_dominance']:.4g}"
        lo, hi = interval(s, "diagonal_dominance")
        if lo is not None:
            txt += f" ({b['ci']:.0%} bootstrap interval {lo:.4g} to {hi:.4g})"
        parts.append(txt)
        if perm.get("p_value") is not None:
            within = " within each record source" if perm.get("stratified_by") == "source" else ""
            over = (f" over {perm['n_units']} instruction groups, the records of a group (near-duplicate "
                    "instructions, data.group_by) keeping one label" if perm.get("unit") == "group" else "")
            parts.append(f"one-sided permutation test p = {perm['p_value']:.4g} ({perm['n_perm']} shuffles of "
                         f"the category labels{within}{over}; the smallest possible p is "
                         f"{1 / (perm['n_perm'] + 1):.2g}). The test is about the labels: a small p says "
                         "that instructions given one category label share more units than instructions "
                         "given different labels, more than a random relabelling gives. It cannot say that "
                         "these units matter for the category (the causal check asks that), nor which "
                         "property of a category (its task, or its length, format or wording) the overlap "
                         "follows")
        else:
            parts.append("no permutation test was run (n_perm = 0)")
        lm = s.get("length_matched") or {}
        if lm.get("p_value") is not None and lm.get("null_mean") is not None:
            parts.append(f"shuffling the labels only among records of similar prompt length ({lm['n_bins']} "
                         f"quantile bins of the counted tokens) gives a null mean of {lm['null_mean']:.4g} "
                         f"and p = {lm['p_value']:.4g}: about that much of the diagonal can come from "
                         "categories differing in prompt length alone; length differences within a bin "
                         "remain, so this p can still be too small where the diagonal follows length")
        between = _between_groups_text(s)
        if between:
            parts.append(between)
    if b:
        if b.get("unit") == "group":
            txt = (f"{b['ci']:.0%} percentile bootstrap intervals over instruction groups ({b['n_boot']} "
                   f"resamples; within each category its groups are drawn with replacement, {sum(b['n_units'])} "
                   f"groups of {s['n_instructions']} records in all, and the records of a group (an instruction "
                   "and its templated near-duplicates, data.group_by) are drawn together, so they count once) are "
                   "in the tables above and in summary.json; paraphrases that share few words (or, with "
                   "data.group_by: text, any differently worded variants) still count as separate draws")
        else:
            txt = (f"{b['ci']:.0%} percentile bootstrap intervals over instructions ({b['n_boot']} resamples, "
                   "drawn within each category) are in the tables above and in summary.json; they treat the "
                   "records as independent draws, so near-duplicate records (e.g. templated variants of one "
                   "instruction) make them too narrow")
        if b["n_boot"] < 100:
            txt += f"; {b['n_boot']} resamples are too few to place the tails of a {b['ci']:.0%} interval"
        note = one_unit_note(b)
        if note:
            txt += f"; {note}"
        parts.append(txt)
        outside = _outside_text(s)
        if outside:
            parts.append(outside)
    else:
        parts.append("no bootstrap was run (n_boot = 0): the counts above carry no interval")
    return "; ".join(parts) + "."


def _grouping_text(g: dict | None) -> str:
    """How the analysed records group into near-duplicates (data.grouping); "" without it."""
    if not g:
        return ""
    t, n = g["text_groups"]["total"], g["near_groups"]["total"]
    near = (f"{n} groups of near-duplicates (records of one category whose instructions' word sets, numbers "
            f"alike, have a Jaccard of at least {g['threshold']}, joined through chains; {g['near_reworded']} records "
            f"share their group with another wording, the largest group {g['largest_near_group']} records)")
    if g["group_by"] == "near":
        said = (f"Near-duplicates: the {g['records']} analysed records form {t} groups of identical instruction "
                f"text and {near}. Groups are the unit of the split, the bootstrap and the permutation tests "
                "(data.group_by: near), so templated variants of one instruction count once.")
    else:
        said = (f"Near-duplicates: the {g['records']} analysed records are grouped by identical instruction text "
                f"only (data.group_by: text), {t} groups; the near-duplicate rule would give {near}. Templated "
                "variants whose texts differ count as independent records here, which makes intervals too narrow "
                "and p-values too small when they share a category.")
    return said + _copies_text(g.get("repeated_records", 0), g.get("cross_category_texts", 0))


def _copies_text(repeated: int, crossed: int) -> str:
    """What copies among the analysed records do to the figures (docs/data.md, "Copies"); "" without any
    (or in a summary made before they were counted)."""
    said = []
    if repeated:
        said.append(f"{repeated} analysed record(s) repeat another record of their category under another id "
                    "(instruction, input and response alike): each copy counts as an instruction of its own in "
                    "the sets, counts and overlaps (the bootstrap and permutation tests draw it with its original "
                    "as one unit when they resample groups, identify.resample: group)")
    if crossed:
        said.append(f"{crossed} instruction text(s) appear under two or more categories: each counts as an "
                    "instruction of each of its categories, which inflates their overlap and lowers their "
                    "uniqueness (the split keeps such a text in one part)")
    return "".join(f" Copies: {s}." for s in said)


def _between_groups_text(s: dict) -> str:
    """How much of the diagonal rests on near-duplicate records (one group); "" when no two
    records do (or the summary predates the entry)."""
    bg = s.get("between_groups")
    if not bg or bg.get("diagonal_dominance") is None:
        return ""
    pairs = {c: n for c, n in bg["within_group_pairs"].items() if n}
    where = ", ".join(f"{SHORT_NAMES[c]} {n}" for c, n in pairs.items())
    jac = [f"{SHORT_NAMES[c]} {bg['within_group_jaccard'][c]:.3g}" for c in pairs
           if bg["within_group_jaccard"][c] is not None]
    txt = (f"leaving out the {sum(pairs.values())} pairs of records that share an instruction group (identical "
           f"or near-duplicate instructions: {where}; "
           f"their mean Jaccard {', '.join(jac) or 'undefined'}), the diagonal dominance is "
           f"{bg['diagonal_dominance']:.4g}")
    said = []
    lo, hi, bias, out = boot_values(bg, "diagonal_dominance")
    if lo is not None:
        b = bg["bootstrap"]
        said.append(f"{b['ci']:.0%} bootstrap interval {lo:.4g} to {hi:.4g} over {b['n_boot']} resamples of whole "
                    "groups, the pairs within a drawn group left out")
        if out:
            said.append(f"the estimate lies outside it, bootstrap bias {_fmt_bias('diagonal_dominance', bias)}")
    p = (bg.get("permutation") or {}).get("p_value")
    if p is not None:
        said.append(f"permutation test over whole groups p = {p:.4g}")
    if said:
        txt += f" ({'; '.join(said)})"
    return (txt + ": the difference from the full diagonal is what near-duplicate instructions alone give. A "
            "small group-level p says that instructions of one category share more units than instructions of "
            "different categories beyond near-duplicate wording; it cannot say which property of a category "
            "(its task, or its length, format or wording) the units respond to, nor discount paraphrases that "
            "share few words")


def _outside_text(s: dict) -> str:
    """Which figures' estimates lie outside their own interval, with their bootstrap bias, and
    what such an interval can show; "" when none does (or the summary predates the flag)."""
    b = s.get("bootstrap") or {}
    found = []
    for key, name in FIGURE_NAMES.items():
        lo, bias, out = boot_values(s, key, ("low", "bias", "outside"))
        if out is None or not np.any(out):
            continue
        if np.ndim(out) == 0:
            found.append(f"{name} (bias {_fmt_bias(key, bias)})")
        elif np.ndim(out) == 1:
            found.append(f"{name} " + ", ".join(f"{CATEGORIES[i]} (bias {_fmt_bias(key, bias[i])})"
                                                for i in np.flatnonzero(out)))
        else:
            n_def = int(np.sum([v is not None for row in lo for v in row]))
            found.append(f"{int(np.sum(out))} of {n_def} {name}")
    if not found:
        return ""
    return (f"The estimate lies outside its own {b['ci']:.0%} interval for {'; '.join(found)}. The set figures "
            "are built from thresholded sets (a unit is in S(c) only past a cut), so resampling the "
            "instructions moves the units near the cut in or out and a figure shrinks or grows on average "
            "(bias = mean over resamples minus the estimate; every figure's bias is in summary.json and in the "
            "bias columns of the tables); where the estimate lies outside, the interval shows the spread of "
            "the figure over resampled studies, not a range that covers its true value, and with few "
            "resamples chance alone also puts estimates outside")


def _interval_list(e: dict, fmt: str, per_category: bool, skip: Sequence[str] = ()) -> str:
    """'CLS +3 [-1, 5], ...' (or one value) of an {estimate, low, high} entry, without the
    categories in `skip`."""
    def one(est, lo, hi):
        if est is None:
            return "undefined"
        return f"{est:{fmt}}" + ("" if lo is None else f" [{lo:{fmt}}, {hi:{fmt}}]")

    if not per_category:
        return one(e["estimate"], e.get("low"), e.get("high"))
    low, high = e.get("low") or {}, e.get("high") or {}
    return ", ".join(f"{SHORT_NAMES[c]} {one(e['estimate'][c], low.get(c), high.get(c))}" for c in CATEGORIES
                     if c not in skip)



def _resampled(boot: Mapping, groups: str = "groups of records") -> str:
    """What a bootstrap entry resampled, in words: `groups` (whole groups) or instructions."""
    return groups if boot.get("unit") == "group" else "instructions"


def _series_change_text(t: dict, names: Sequence[str]) -> str:
    """The change of the series' trends from the first to the last checkpoint with its paired
    interval, and what it can show; without paired draws, that the trends carry no interval."""
    b = t.get("bootstrap")
    if not b:
        return ("The trends carry no intervals (the checkpoints were not bootstrapped with the same draws of "
                "instructions), so a rise or fall along the series cannot be told from the variation with the "
                "instructions drawn.")
    ch = b["change"]
    unit = _resampled(b)
    absent = unmeasured(t)
    parts = [f"|S(c)| {_interval_list(ch['per_category_count'], '+.4g', True, absent)}",
             f"unique ratio {_interval_list(ch['unique_ratio'], '+.3g', True, absent)}",
             f"general share {_interval_list(ch['general_share'], '+.3g', False)}"]
    if absent:
        parts[1] += f" ({', '.join(SHORT_NAMES[c] for c in absent)}: no instructions)"
    if "diagonal_dominance" in ch:
        parts.append(f"diagonal dominance {_interval_list(ch['diagonal_dominance'], '+.3g', False)}")
    return (f"Change from {names[0]} to {names[-1]}, with {b['ci']:.0%} paired bootstrap intervals over "
            f"{b['n_boot']} resamples of {unit} (the same draw at every checkpoint, so the change is computed "
            f"within a draw): {'; '.join(parts)}. A change whose interval spans 0 is not told apart from the "
            "variation with the instructions drawn; one that excludes 0 is a change on these records, not "
            "evidence that it is monotone in between (the per-checkpoint intervals are in the series tables) "
            "or larger than two runs of the same weights would differ.")


def _no_instructions(absent: Sequence[str]) -> str:
    """'GEN, MATH have no instructions' of categories `absent`."""
    return f"{', '.join(SHORT_NAMES[c] for c in absent)} {'has' if len(absent) == 1 else 'have'} no instructions"


def _no_records_text(entry: Mapping[str, dict]) -> str:
    """What the comparison figure does with the categories without instructions ("" without any)."""
    absent = unmeasured_compared(entry)
    return (f" {_no_instructions(absent)}: nothing was measured, so they have no bars (marked \"no records\")."
            if absent else "")


def _unmeasured_text(t: dict) -> str | None:
    """What the series figure and tables do with the categories the study has no instructions of."""
    absent = unmeasured(t)
    if not absent:
        return None
    return (f"{_no_instructions(absent)} in this study: nothing was measured for them, so they are not drawn and "
            "their cells in the series tables are empty, not 0.")


def _template_effect_text(ctrl: Mapping[str, dict]) -> str | None:
    """The main comparison's Jaccard minus the same-template control's, per category, with its
    paired interval; None when the control has no template effect entry."""
    if not all(ctrl[c].get("template_effect") for c in CATEGORIES):
        return None
    eff = {c: ctrl[c]["template_effect"] for c in CATEGORIES}
    first = eff[CATEGORIES[0]]
    jac = {k: {c: eff[c]["jaccard"][k] for c in CATEGORIES} for k in ("estimate", "low", "high")}
    txt = f"Template effect on the Jaccard (main comparison minus this control): {_interval_list(jac, '+.3g', True)}"
    if not first["paired"]:
        return txt + (", without an interval (the three models were not bootstrapped with the same draws of "
                      "instructions).")
    unit = _resampled(first)
    return (txt + f", with {first['ci']:.0%} paired bootstrap intervals over {first['n_boot']} resamples of {unit} "
            "(the same draw for all three models). An interval that excludes 0 says the prompt template moved "
            "the comparison beyond the variation with the instructions drawn; one that spans 0 does not separate "
            "a template effect from that variation. Retained, gained and lost are in the control's table.")


def _fmt_bias(key: str, v) -> str:
    """A bias for the text: percentage points for the general share."""
    if v is None:
        return "undefined"
    return f"{100 * v:+.2g} percentage points" if key == "general_share" else f"{v:+.3g}"


def _has_value(m) -> bool:
    """Whether a nested list (None = undefined) holds any number."""
    return m is not None and any(v is not None for row in m for v in row)


def _mass_blocks(kind: str, d: dict) -> list:
    """The mass-matched control's table and caption (experts: routing mass; neurons: firing mass)."""
    mm, word = d["mass_matched"], kind.replace("_", " ")
    tol = mm.get("error_tolerance") or MASS_TOLERANCE  # (not in files made before it)
    if kind == "experts":
        layers = mm.get("set_layer_mass") is not None  # (not in files of the earlier rule)
        title = "mass-matched random draws and the routing mass they dropped"
        text = CAPTIONS["ablation_mass"].format(n=mm["n_random"], tol=tol, kind=kind) + (
            CAPTIONS["ablation_mass_layers"].format(kind=kind) if layers else "")
    else:
        title = "firing-mass-matched random draws and the firing mass they carry"
        where = (CAPTIONS["ablation_firing_where"].format(gap=FREQUENCY_GAP) if mm.get("where") == "where_warned"
                 else "")
        # (files without a source counted the identification's; None: a caller's own masses, not said)
        src = mm.get("source", "identification")
        records = {"held_out": "held-out records (those its loss is measured on)",
                   "identification": "identification records"}.get(src, "records (which ones was not recorded)")
        source = (CAPTIONS[f"ablation_firing_{src}"].format(kind=kind, few=MIN_SCORED_RECORDS,
                                                             share=MIN_SCORED_FRACTION)
                  if src in FIRING_SOURCES else "")
        magnitude = (CAPTIONS["ablation_firing_magnitude"].format(units=word, kind=kind, gap=mm["magnitude"]["gap"])
                     if mm.get("magnitude") else CAPTIONS["ablation_firing_no_magnitude"])
        text = CAPTIONS["ablation_firing_mass"].format(n=mm["n_random"], tol=tol, kind=kind, units=word,
                                                       records=records, source=source) + where + magnitude
    blocks = [TableBlock(f"Ablation ({word}): own-category excess over {mm['n_random']} {title}",
                         mass_header(kind), mass_rows(d)), TextBlock(text)]
    return blocks + ([] if kind == "experts" else _magnitude_matched_blocks(kind, d))


def _magnitude_matched_blocks(kind: str, d: dict) -> list:
    """The magnitude-matched control's table and caption (neuron kinds), or the line saying it was not run."""
    mg, word = d.get("magnitude_matched"), kind.replace("_", " ")
    if not mg:
        return [TextBlock(CAPTIONS["ablation_no_magnitude_matched"].strip())]
    where = (CAPTIONS["ablation_magnitude_where"].format(gap=MAGNITUDE_GAP) if mg.get("where") == "where_warned"
             else "")
    return [TableBlock(f"Ablation ({word}): own-category excess over {mg['n_random']} magnitude-matched random "
                       "draws and the activation and firing they carry", magnitude_matched_header(kind),
                       magnitude_matched_rows(d)),
            TextBlock(CAPTIONS["ablation_magnitude_matched"].format(n=mg["n_random"], units=word, where=where,
                                                                     tol=mg.get("error_tolerance") or MASS_TOLERANCE))]


def _matching_text(d: dict) -> str:
    m = d.get("matching") or {}
    k = m.get("nearest_frequency")
    txt = f"the same number of units per {m.get('group', 'layer')}"
    if k:
        txt += f", each unit of the set replaced by one of the {k} units nearest to it in activation frequency"
    if m.get("exclude_tested_set"):
        txt += ", drawn outside the tested set"
    return txt


def _rule_blocks(summary: dict) -> list:
    support = summary.get("rule_support") or {}
    main = summary["identification"]
    rows = [[f"{main['rule']} (main)", support.get(main["rule"])]]
    rows += [[f"{r} (contrast)", t] for r, t in support.items() if r != main["rule"]]
    return [TableBlock("Which finding each identification rule can support", ["rule", "what it can show"], rows)]


def _environment_blocks(summary: dict) -> list:
    """The software the report was made with, every output made under several environments (a
    resumed collection or training run: summary.json's "environment_parts"), and every output it
    shows that was made under other versions of what can change a number (summary.json's
    "environment_changes"): those set against each other in other versions first (they can
    change a number), then those that cannot (recorded)."""
    if "environment" not in summary:  # (a summary of an earlier sparcom_jax)
        return []
    blocks: list = [TextBlock(f"Software: {environment_line(summary['environment'])}." + "".join(
        f" {p.get('pair') + ': ' if p.get('pair') else ''}{p['text']}." for p in summary.get("environment_parts") or ()))]
    changes = summary.get("environment_changes") or []
    if not changes:
        blocks.append(TextBlock("Every output these numbers come from was made under the same versions of jax, "
                                "jaxlib, flax, optax, numpy, transformers and tokenizers, on the same backend."))
        return blocks
    matter = [c for c in changes if c.get("matters", True)]  # (a summary without "matters": all)
    quiet = [c for c in changes if not c.get("matters", True)]
    if matter:
        blocks.append(_changes_table("Outputs set against each other, made under other versions", matter))
        blocks.append(TextBlock(
            "These outputs were reused, not recomputed (package versions are not part of the fingerprints), and "
            "the counts and causal checks on this page were not all made under the same jax, jaxlib, flax and "
            "device: the same inputs and settings can give other counts, sets and losses under another of these, "
            "so differences between them (before and after, a store's chunks, the sets a causal check measured) "
            "mix the two. Each model's counts record theirs in summary.json's models.<model>.meta.environment(s). "
            "To recompute an output under this environment, remove it (or run into a new --out) and run again: "
            "--overwrite alone keeps what still matches its settings."))
    if quiet:
        blocks.append(_changes_table("Outputs made under other versions that cannot change a number here", quiet))
        blocks.append(TextBlock(
            "Recorded, not a concern for this page: its numbers are computed here by numpy from stored integer "
            "counts and losses, which another jax, backend or device kind here cannot change, and the fine-tuned "
            "weights are files counted afresh. Counts made on an accelerator and reported on a CPU differ in backend "
            "only. What each change can affect is in docs/cli.md, \"What an environment change can affect\"."))
    return blocks


def _changes_table(title: str, changes: list) -> TableBlock:
    """`_environment_blocks`' table of summary.json "environment_changes" entries."""
    pair, part = any("pair" in c for c in changes), any("part" in c for c in changes)
    rows = [[*([c.get("pair")] if pair else []), c["output"], *([c.get("part", "")] if part else []), c["stage"],
             c["package"], c["old"], c["new"]] for c in changes]
    return TableBlock(title, [*(["pair"] if pair else []), "output", *(["part"] if part else []), "made by",
                              "package", "made under", "now"], rows)


def _template_text(summary: dict, comp: dict) -> str | None:
    t = summary.get("templates") or {}
    if not t:
        return None
    txt = "Templates used: " + ", ".join(f"{m}: {v}" for m, v in t.items()) + "."
    b, a = comp.get("before"), comp.get("after")
    if b in t and a in t and t[b] != t[a]:
        txt += (f" {b} and {a} were counted with different templates, so the main comparison mixes "
                "template and weight effects" + ("; see the same-template control." if
                                                  "same_template" in (summary.get("controls") or {})
                                                  else " and no same-template control was given."))
    return txt


def _series_template_text(summary: dict, names: Sequence[str]) -> str | None:
    """Where the checkpoints of a series were counted under different templates, what that mixes in."""
    t = summary.get("templates") or {}
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(str(t.get(n)), []).append(n)
    if len(groups) < 2 or "None" in groups:
        return None
    return ("The checkpoints were counted under different templates (" + "; ".join(
        f"{tmpl}: {', '.join(ns)}" for tmpl, ns in groups.items()) + "), so a change between two "
        "checkpoints of different templates (a Jaccard with the first checkpoint included) mixes template "
        "and weight effects; the same-template control, where given, covers the last checkpoint only.")


def _set_table(title: str, entry: Mapping[str, dict], key: str | None = None,
               shift: bool = False) -> TableBlock:
    """retained/gained/lost per category of a comparison section (or its `key` sub-entry),
    with the mean frequency over all units before and after when `shift`, and the paired
    bootstrap interval of the Jaccard where the main comparison has one. A category without
    instructions shows – (`measured_comparison`), and the title says why."""
    absent = unmeasured_compared(entry)
    if absent:
        title += f" (– for {', '.join(SHORT_NAMES[c] for c in absent)}: no instructions, nothing measured)"
    entry = measured_comparison(entry)
    get = (lambda c: entry[c]) if key is None else (lambda c: entry[c].get(key) or {})
    fs = ("mean_before", "mean_after")
    boot = key is None and any(entry[c].get("bootstrap") for c in CATEGORIES)

    def jac(c):
        return (entry[c].get("bootstrap") or {}).get("jaccard") or {}

    return TableBlock(title, ["category", *SET_KEYS, *(["mean p before", "mean p after"] if shift else []),
                              *(["jaccard low", "jaccard high"] if boot else [])],
                      [[c, *[get(c).get(k) for k in SET_KEYS],
                        *([entry[c]["frequency_shift"][k] for k in fs] if shift else []),
                        *([jac(c).get("low"), jac(c).get("high")] if boot else [])] for c in CATEGORIES])


def _category_table(name: str, section: str, s: dict) -> TableBlock:
    ci = f"{(s.get('bootstrap') or {}).get('ci', 0.95):.0%}"
    over = _resampled(s.get("bootstrap") or {}, "instruction groups")
    return TableBlock(
        f"{name}: {UNIT_WORD[section]} per category (low / high: {ci} bootstrap interval over {over}; "
        "bias: mean over resamples minus the estimate; – = not computed or undefined)",
        ["category", "instructions", "|S(c)|", "low", "high", "|U(c)|", "low", "high", "|U(c)|/|S(c)|",
         "mean |S(I)|", "|S(c)| bias", "|U(c)| bias"],
        [[c, s["n_per_category"][c], s["per_category_count"][c], *interval(s, "per_category_count", i),
          s["unique"][c], *interval(s, "unique", i), s["unique_ratio"][c], s["mean_instruction_set_size"][c],
          *boot_values(s, "per_category_count", ("bias",), i), *boot_values(s, "unique", ("bias",), i)]
         for i, c in enumerate(CATEGORIES)])


def _general_text(name: str, section: str, s: dict) -> TextBlock:
    """The general set as a count and a share of the union, each with its interval."""
    units = UNIT_WORD[section]
    if s["general"] is None:
        return TextBlock(f"{name}: general {units} are undefined with fewer than two categories that have "
                         f"instructions (in every set would mean in the one set); {s['union']} {units} are in "
                         "at least one set (the union).")
    share = "undefined (no unit is in any set)" if s["general_share"] is None else f"{s['general_share']:.1%}"
    txt = (f"{name}: {s['general']} {units} are in all six categories' sets (general), {share} of the "
           f"{s['union']} {units} in at least one set (the union)")
    (lo, hi, bias, out), (slo, shi, sbias, sout) = boot_values(s, "general"), boot_values(s, "general_share")
    if lo is not None:
        txt += f"; {s['bootstrap']['ci']:.0%} bootstrap interval {lo:.4g} to {hi:.4g} {units}"
        if slo is not None:
            txt += f", share {slo:.1%} to {shi:.1%}"
        if bias is not None:
            txt += f"; bootstrap bias {_fmt_bias('general', bias)} {units}"
            if sbias is not None:
                txt += f", share {_fmt_bias('general_share', sbias)}"
        moved = [f"the {what} {down if v < 0 else up}" for what, o, v, down, up in (
            ("count", out, bias, "shrinks", "grows"), ("share", sout, sbias, "falls", "rises")) if o]
        if moved:
            txt += (f" (outside its interval: {' and '.join(moved)} when the instructions are resampled, "
                    "see the bootstrap note below)")
    return TextBlock(txt + ".")


def _model_blocks(name: str, section: str, s: dict) -> list:
    """Per-category diagonal, contrast-rule sizes, set size vs length and top instructions."""
    out: list = []
    units = UNIT_WORD[section]
    dom = dominance_rows(s)
    if dom is not None:
        out.append(TableBlock(f"{name}: instruction-level diagonal dominance per category ({units}; mean "
                              "same-category Jaccard minus the mean of its five cross-category blocks; bootstrap "
                              "interval, one-sided permutation p; the same on the human-written subset of "
                              "human_n records; bootstrap bias and whether the estimate lies outside its "
                              "interval; the same without the within_group_pairs pairs of records of one "
                              "instruction group, tested by shuffling whole groups, with its interval, bias "
                              "and outside flag from drawing whole groups; permutation_p_holm: the six "
                              "per-category p-values Holm-adjusted, to be read against 0.05 when the claim is "
                              "about any of the six categories; length_matched: the test with labels "
                              "shuffled among records of similar prompt length, and its null mean; "
                              "– = undefined, e.g. "
                              "fewer than two records of the category in the subset, or not computed)",
                              DOMINANCE_HEADER, dom))
    c = s.get("contrast")
    if c:
        out.append(TableBlock(
            f"{name}: {units} per category under the main and the contrast rule "
            f"({c['identification']['rule']}, threshold {c['identification']['threshold']})",
            ["category", "|S(c)| main", "|S(c)| contrast", "mean |S(I)| main", "mean |S(I)| contrast"],
            [[k, s["per_category_count"][k], c["per_category_count"][k], s["mean_instruction_set_size"][k],
              c["mean_instruction_set_size"][k]] for k in CATEGORIES]))
    v = s.get("set_size_vs_length")
    if v:
        out.append(TableBlock(f"{name}: instruction set size vs prompt length (Spearman correlation of |S(I)| "
                              "with T(I); with ties broken, the columns 'ties kept' give the same rule "
                              "keeping every unit tied at the cut, as the paper's rule does)",
                              LENGTH_HEADER, length_rows(v)))
    if s.get("top_instructions"):
        out.append(TableBlock(f"{name}: the instructions that activate each listed {units[:-1]} most "
                              "(units: the highest category mean frequency in each set)",
                              TOP_HEADER, top_instruction_rows(s["top_instructions"])))
    return out


def write_report(
    out_dir: str | os.PathLike,
    summary: dict,
    *,
    analyses: Mapping[str, ModelAnalysis] | None = None,
    title: str = "SPARCOM report",
    dpi: int = 100,
) -> dict[str, list[str]]:
    """Write the whole report directory.

    Args:
      out_dir: destination (created).
      summary: build_summary output (JSON-safe).
      analyses: optional {model name: ModelAnalysis}; adds the instruction x
        instruction heatmaps and the ISN/ISE list exports, which need arrays
        that summary.json does not hold.
      title: page title.
      dpi: figure resolution.

    Returns:
      {"summary": [...], "tables": [...], "figures": [...], "sets": [...], "html": [...]} paths.
    """
    # matplotlib is imported when a report is drawn, not with sparcom_jax.report (the sets and
    # tables are written without it).
    from sparcom_jax.report import figures as F

    out = os.fspath(out_dir)
    written: dict[str, list[str]] = {k: [] for k in ("summary", "tables", "figures", "sets", "html")}
    written["summary"].append(write_json(os.path.join(out, "summary.json"), summary))

    rule = " ".join(f"{k}={v}" for k, v in summary["identification"].items())
    software = [f"environment: {environment_line(summary['environment'])}"] if "environment" in summary else []
    for t in all_tables(summary):
        written["tables"].append(write_csv(os.path.join(out, "tables", t.name + ".csv"), t.header, t.rows,
                                           comments=[f"identification: {rule}", *software]))

    for name, ma in (analyses or {}).items():
        for fa in ma.fields.values():
            written["sets"].extend(export_sets(os.path.join(out, "sets"), fa.ident, prefix=safe_name(name) + "_"))

    blocks: list = []

    def add(fig, filename: str, fig_title: str, caption: str):
        png = F.to_png(fig, dpi=dpi)
        written["figures"].append(atomic_write(os.path.join(out, "figures", filename), png))
        blocks.append(FigureBlock(fig_title, png, caption, filename))

    models = summary["models"]
    blocks.append(TextBlock("Set-up", heading=True))
    blocks.append(TextBlock(json.dumps({k: summary.get(k) for k in (
        "identification", "model_paths", "data", "scope", "templates")}, indent=2), pre=True))
    blocks.append(TextBlock("Categories: " + ", ".join(f"{c} ({SHORT_NAMES[c]})" for c in CATEGORIES)
                            + ". Layers are numbered from 0."))
    grouping = _grouping_text((summary.get("data") or {}).get("grouping"))
    if grouping:
        blocks.append(TextBlock(grouping))
    comp = summary.get("comparison") or {}
    controls = summary.get("controls") or {}
    tmpl = _template_text(summary, comp)
    if tmpl:
        blocks.append(TextBlock(tmpl))
    blocks.extend(_rule_blocks(summary))
    blocks.extend(_environment_blocks(summary))

    sections = [s for s in SECTION_TITLES if any(s in m for m in models.values())]
    series = summary.get("series") or {}
    for sec in sections:
        units = UNIT_WORD[sec]
        have = {n: m[sec] for n, m in models.items() if sec in m}
        blocks.append(TextBlock(SECTION_TITLES[sec], heading=True))
        for n, s in have.items():
            blocks.append(_category_table(n, sec, s))
            blocks.append(_general_text(n, sec, s))
            txt = _bootstrap_text(s)
            if txt:
                blocks.append(TextBlock(f"{n}: {txt}"))
            blocks.extend(_model_blocks(n, sec, s))
        pairs = {n: s["set_size_vs_length"] for n, s in have.items()
                 if (s.get("set_size_vs_length") or {}).get("tokens") is not None}
        if pairs:
            add(F.size_vs_length(pairs, f"{SECTION_TITLES[sec]}: set size vs prompt length"),
                f"set_size_vs_length_{sec}.png", "Set size vs prompt length", CAPTIONS["size_vs_length"])
        # A model whose every S(c) is empty has no category-level figure to draw: say so instead.
        chosen = {n: s for n, s in have.items() if any(s["per_category_count"].values())}
        if len(chosen) < len(have):
            blocks.append(TextBlock(
                f"{', '.join(n for n in have if n not in chosen)}: no {units} were selected for any category "
                "(every S(c) is empty; e.g. a threshold above every frequency), so the category overlap, layer "
                "distribution and generality figures " + ("show only the other models." if chosen else
                                                          "are left out.")))
        if chosen:
            blanks = "; ".join(f"{n}: {', '.join(SHORT_NAMES[c] for c in CATEGORIES if not s['per_category_count'][c])}"
                               for n, s in chosen.items() if not all(s["per_category_count"].values()))
            add(F.overlap_heatmaps({n: s["overlap_jaccard"] for n, s in chosen.items()},
                                   f"{SECTION_TITLES[sec]}: category overlap"),
                f"overlap_{sec}.png", "Category overlap", CAPTIONS["overlap"].format(units=units)
                + (f" Empty sets (blank row and column): {blanks}." if blanks else ""))
        inst = {n: s["instruction_overlap"] for n, s in have.items() if _has_value(s.get("instruction_overlap"))}
        if inst:
            add(F.overlap_heatmaps(inst, f"{SECTION_TITLES[sec]}: instruction-level overlap",
                                   label="mean pairwise Jaccard"),
                f"instruction_overlap_{sec}.png", "Instruction-level overlap",
                CAPTIONS["instruction_overlap"].format(units=units))
        for n, ma in (analyses or {}).items():
            fa = ma.fields.get(sec)
            if fa is not None and fa.instruction_matrix is not None and np.isfinite(fa.instruction_matrix).any():
                add(F.instruction_heatmap(fa.instruction_matrix, fa.ident.labels, f"{n}: {units}"),
                    f"instruction_matrix_{safe_name(n)}_{sec}.png", f"Instruction x instruction ({n})",
                    CAPTIONS["instruction_matrix"].format(units=units))
        if chosen:
            add(F.layer_distribution({n: s["per_layer"] for n, s in chosen.items()},
                                     f"{SECTION_TITLES[sec]}: layer distribution",
                                     phases={n: s["phases"] for n, s in chosen.items()}, ylabel=f"{units}"),
                f"layers_{sec}.png", "Layer distribution", CAPTIONS["layers"].format(units=units))
            add(F.generality_uniqueness(chosen, f"{SECTION_TITLES[sec]}: generality and uniqueness", units=units),
                f"generality_{sec}.png", "Generality and uniqueness", CAPTIONS["generality"])
        if sec in comp:
            b, a = comp["before"], comp["after"]
            if any(comp[sec][c]["size_before"] or comp[sec][c]["size_after"] for c in CATEGORIES):
                add(F.comparison_bars(comp[sec], f"{SECTION_TITLES[sec]}: {b} → {a}", b, a),
                    f"comparison_{sec}.png", f"Comparison {b} → {a}",
                    CAPTIONS["comparison"].format(before=b, after=a) + _no_records_text(comp[sec]))
            rules = comp.get("rules") or {}
            main_rule = (rules.get("main") or {}).get("identification", {}).get("rule", "main rule")
            blocks.append(_set_table(f"{b} → {a}: {units} per category ({main_rule}, main rule)", comp[sec]))
            if rules.get("contrast") and any(comp[sec][c].get("contrast") for c in CATEGORIES):
                crule = rules["contrast"]["identification"]["rule"]
                blocks.append(_set_table(f"{b} → {a}: {units} per category ({crule}, contrast rule; mean "
                                         "p = mean frequency over all units)", comp[sec], "contrast",
                                         shift=True))
                blocks.append(TextBlock(f"Main rule ({main_rule}): {rules['main']['supports']} "
                                        f"Contrast rule ({crule}): {rules['contrast']['supports']}"))
            for cname, ctrl in controls.items():
                if sec in ctrl:
                    blocks.append(_set_table(f"Control '{cname}' ({ctrl.get('before')} → {ctrl.get('after')}): "
                                             f"{units} per category", ctrl[sec]))
                    if cname == "same_template":
                        blocks.append(TextBlock(SAME_TEMPLATE_TEXT))
                        effect = _template_effect_text(ctrl[sec])
                        if effect:
                            blocks.append(TextBlock(effect))
        for n, s in have.items():
            if sec == "ise" and s.get("category_mean_frequency"):
                add(F.expert_heatmaps(s["category_mean_frequency"], f"{n}: expert routing frequency",
                                      label="mean routing frequency"),
                    f"expert_frequency_{safe_name(n)}.png", f"Expert routing frequency ({n})",
                    CAPTIONS["ise_frequency"].format(model=n))
            if sec == "expert_neurons" and s.get("per_expert"):
                add(F.expert_heatmaps(s["per_expert"], f"{n}: instruction-specific expert neurons",
                                      label="selected neurons"),
                    f"expert_neurons_{safe_name(n)}.png", f"Expert neurons per expert ({n})",
                    CAPTIONS["expert_neurons_count"].format(model=n))
        if sec in series:
            add(F.series_trends(series["names"], series[sec], f"{SECTION_TITLES[sec]}: along the series"),
                f"series_{sec}.png", "Checkpoint series",
                " ".join(filter(None, (CAPTIONS["series"], _series_template_text(summary, series["names"]),
                                       _unmeasured_text(series[sec])))))
            blocks.append(TextBlock(_series_change_text(series[sec], series["names"])))

    ablation = summary.get("ablation") or {}
    # Base and tuned sets and losses differ: the page names the model whose check it shows.
    abl_model = summary.get("ablation_model")
    of_model = f" of {abl_model}" if abl_model else ""
    for kind in ("neurons", "experts", "expert_neurons"):
        d = ablation.get(kind)
        if not d:
            continue
        word = kind.replace("_", " ")
        blocks.append(TextBlock(f"Causal check: ablating {word}{of_model}", heading=True))
        if summary.get("ablation_not_shown"):
            blocks.append(TextBlock(
                f"This is the causal check of model {abl_model}; that of {', '.join(summary['ablation_not_shown'])} "
                "(ablation.model=both) is in OUT/ablate/<model>_<kind>.json, not on this page."))
        add(F.ablation_matrices(d["isn"], d["random"], f"Loss increase when {word} are switched off"),
            f"ablation_{kind}.png", f"Ablation ({word})",
            CAPTIONS["ablation"].format(kind=word) + (
                CAPTIONS["ablation_controls"].format(n=d["n_random"], matching=_matching_text(d)) if d["n_random"]
                else " No random control sets were drawn, so only the instruction-specific sets' losses are shown."))
        isn = matrix_table("", d["isn"], corner=ABLATION_CORNER)
        blocks.append(TableBlock(f"Ablation ({word}): loss increase (nats per response token), ablated (rows) "
                                 "x evaluated",
                                 isn.header, isn.rows))
        blocks.append(TableBlock(f"Ablation ({word}): own-category excess over {d['n_random']} matched "
                                 "random draws, dropped routing mass and control quality",
                                 ABLATION_HEADER, ablation_rows(d)))
        for w in (d.get("coverage_warnings") or []) + (d.get("matching_warnings") or []):
            blocks.append(TextBlock(f"Warning: {w}."))
        if d.get("mass_matched"):
            blocks += _mass_blocks(kind, d)
        if not d["n_random"]:
            blocks.append(TextBlock(
                "No random control sets were drawn (ablation.n_random=0): the loss increases above cannot "
                "be set against removing as many other units, so they say nothing about whether these "
                "sets matter more than any others; the random and excess columns are empty."))
        else:
            blocks.append(TextBlock(
                "excess_own = loss increase on the ablated category itself minus the mean of the random "
                "draws; excess_own_std = its spread over draws; random_ge_fraction_own = the share of random "
                "draws that hurt at least as much as the specific set, and p_own = (1 + their number) / "
                f"(1 + {d['n_random']}), the Monte-Carlo p-value of 'the set hurts its category more than "
                f"matched random sets': with {d['n_random']} draws its smallest value is "
                f"{1 / (d['n_random'] + 1):.2g}, reached when no draw hurts as much (a fraction of 0 is not "
                "p = 0), and the six categories are six tests (compare with 0.05 / 6 for a family-wise 5 % "
                "level, which 1 / (1 + D) reaches from D = 119 draws on). in_set counts units a draw had to take "
                "from the tested set (0 = a clean control). set_frequency and random_frequency_mean = the mean "
                "activation frequency of the set's units and of the draws' units; closest_frequency = that of "
                "the closest match the data allow (each unit replaced by its nearest unit outside the set), "
                "and above_others = the set's units that fire more often than every unit of their layer "
                "(expert) outside the set. A set chosen for frequent firing can hold its layers' busiest "
                "units, which no draw can match: where the draws fire clearly less than the set (a warning "
                "above names the category), part of the excess can come from removing more active units, "
                "not from what the set is specific to. dropped_mass = routing probability mass "
                "removed by the ablation (experts only, when the model reports it). held_out_records / "
                "scored_records / response_tokens = the category's held-out records, those that keep a "
                "response token within data.max_length, and the tokens its loss averages over."))

    prec = precision_table(summary.get("precision"))
    if prec is not None:
        blocks.append(TextBlock("Precision: bfloat16 vs float32", heading=True))
        blocks.append(TableBlock("Set Jaccard between bfloat16 and float32 counts", prec.header, prec.rows))
        notes = [f"{k}: {v}" for k, v in summary["precision"].items() if not isinstance(v, dict)]
        blocks.append(TextBlock(
            "1 = identical sets. Claims that rest on sets whose Jaccard is well below 1 here depend on "
            "the precision the counts were collected in." + (" " + "; ".join(notes) if notes else "")))

    blocks.append(TextBlock("Files", heading=True))
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    blocks.append(TextBlock("\n".join(rel(p) for k in ("summary", "tables", "sets") for p in written[k]),
                            pre=True))
    written["html"].append(atomic_write(os.path.join(out, "index.html"), render_html(title, blocks)))
    return written
