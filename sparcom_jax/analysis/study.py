"""From counts to the summary: analyse models, compare them, assemble summary.json.

    cfg = IdentifyConfig()
    base = analyze_model(counts_base, cfg, name="base")
    tuned = analyze_model(counts_tuned, cfg, name="tuned")
    comparison = compare_models(base, tuned)
    summary = build_summary({"base": base, "tuned": tuned}, config=cfg,
                            comparison=comparison, ablation=ablation_result,
                            templates={"base": "plain", "tuned": "chat"},
                            controls={"same_template": compare_models(base, tuned_plain)})

Every section is JSON-safe (NaN -> None); categories are always in CATEGORIES order.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from sparcom_jax.analysis import compare as cmp
from sparcom_jax.analysis import evaluate as ev
from sparcom_jax.analysis.ablate import AblationResult
from sparcom_jax.analysis.common import C, SECTIONS, UNIT_AXES, by_category, jsonable, nan_mean
from sparcom_jax.analysis.examples import top_instructions
from sparcom_jax.analysis.identify import (
    RULE_SUPPORT, IdentifyConfig, Identification, check_field, check_inputs, contrast_config, identify_all,
)
from sparcom_jax.analysis.uncertainty import (
    bootstrap, cluster_index, instruction_bootstrap, one_unit_note, paired_intervals, paired_set_intervals,
    permutation_test, series_dominance, series_figures, set_figures, units_per_category,
)
from sparcom_jax.categories import CATEGORIES, SHORT_NAMES, absent_categories, per_category_text
from sparcom_jax.stats.counts import Counts

SUMMARY_VERSION = 1
# Bit-pack S(I) when the bool [N, *U] sets would exceed 1 GiB (MoE expert neurons).
_PACK_ABOVE = 1 << 30


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


@dataclasses.dataclass(repr=False)
class FieldAnalysis:
    """One count field of one model.

    Attributes:
      ident: the identification (S(I) dropped unless asked to keep them).
      instruction_matrix: float32 [N, N] instruction Jaccard in original order,
        or None when instruction-level analysis was skipped.
      summary: the JSON-safe `models.<name>.<section>` dict.
      contrast: the identification under the contrast rule (`contrast_config`),
        category level only, or None when it was not run.
      replicate_sets: uint8 [B, C, ceil(U/8)] each bootstrap replicate's category
        sets, bit-packed, or None without a bootstrap: a comparison with another
        model resampled with the same draws pairs them (`compare_fields`).
      boot_weights: float32 [B, N] those draws, or None.
    """

    ident: Identification
    instruction_matrix: np.ndarray | None
    summary: dict
    contrast: Identification | None = None
    replicate_sets: np.ndarray | None = None
    boot_weights: np.ndarray | None = None

    def __repr__(self) -> str:
        return "FieldAnalysis " + "\n".join(self._lines())

    def _lines(self) -> list[str]:
        """The headline figures, one per line (the first names the section)."""
        s = self.summary
        absent = absent_categories(s["n_per_category"])
        rows = [("|S(c)|", per_category_text(s["per_category_count"], absent)),
                ("unique", per_category_text(s["unique"], absent)),
                ("general / union", f"{'-' if s['general'] is None else s['general']} / {s['union']}")]
        if absent:
            rows.append(("no instructions", f"{', '.join(SHORT_NAMES[c] for c in absent)} (shown as -; general: in "
                                            f"all {C - len(absent)} categories that have instructions)"))
        if s.get("diagonal_dominance") is not None:
            diag = _num(s["diagonal_dominance"])
            boot = (s.get("bootstrap") or {}).get("diagonal_dominance")
            if boot:
                diag += f" [{_num(boot['low'])}, {_num(boot['high'])}] ({s['bootstrap']['ci']:.0%} bootstrap)"
            if s.get("permutation"):
                diag += f", permutation p {_num(s['permutation']['p_value'])}"
            rows.append(("diagonal", diag))
        note = one_unit_note(s.get("bootstrap"))
        if note:
            rows.append(("bootstrap", note))
        if s.get("contrast"):
            rule = IdentifyConfig.from_dict(s["contrast"]["identification"]).describe()
            rows.append(("|S(c)| contrast", f"{per_category_text(s['contrast']['per_category_count'], absent)} ({rule})"))
        head = (f"{self.ident.section}: {self.ident.field} [{', '.join(map(str, self.ident.unit_shape))}], "
                f"{self.ident.n} instructions")
        return [head] + [f"  {label:<17} {text}" for label, text in rows]


@dataclasses.dataclass(repr=False)
class ModelAnalysis:
    """All analysed fields of one model, keyed by section ("isn", "ise", "expert_neurons")."""

    name: str
    config: IdentifyConfig
    fields: dict[str, FieldAnalysis]
    meta: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, section: str) -> FieldAnalysis:
        if section not in self.fields:  # e.g. "isn" of a Mixtral, which has no dense or shared-expert neurons
            known = ", ".join(f"{sec!r} ({field})" for field, sec in SECTIONS.items())
            raise KeyError(f"{self.name!r} has no section {section!r}; it has {sorted(self.fields)}. Sections: "
                           f"{known}, each present when the counts have that field and analyze_model(fields=...) "
                           "kept it")
        return self.fields[section]

    def __repr__(self) -> str:
        made = ", ".join(f"{k} {self.meta[k]!r}" for k in ("model", "dtype", "scope", "template")
                         if self.meta.get(k) is not None)
        lines = [f"ModelAnalysis {self.name!r}: {self.config.describe()}" + (f"; {made}" if made else "")]
        for fa in self.fields.values():
            lines += ["  " + line for line in fa._lines()]
        lines.append("  every figure: .summary() (keys in docs/analysis.md)")
        return "\n".join(lines)

    def summary(self) -> dict:
        """The `models.<name>` dict: {"meta": ..., "<section>": ...}."""
        return jsonable({"meta": self.meta, **{k: v.summary for k, v in self.fields.items()}})


def field_summary(ident: Identification, instruction_matrix: np.ndarray | None = None, *,
                  n_perm: int = 0, seed: int = 0) -> dict:
    """The point estimates of one field (everything but bootstrap and the diagonal's permutation test).

    Args:
      ident: identification.
      instruction_matrix: optional float [N, N] instruction Jaccard.
      n_perm: layer-order shuffles of each phase fit (`locate_phases`; 0 = none).
      seed: their RNG seed.

    Returns:
      JSON-safe dict; see docs/analysis.md for each key.
    """
    sets = ident.category_sets
    present = ident.n_per_category > 0
    jac, coef = ev.category_overlap(sets, present)
    gen = ev.generality(sets, present)
    uniq = ev.uniqueness(sets)
    count, share = ev.layer_distribution(sets)
    union_l = sets.any(0).reshape(sets.shape[1], -1).sum(1)
    mean_size = [nan_mean(ident.instruction_size[ident.labels == c]) for c in range(C)]  # NaN -> None
    s: dict[str, Any] = {
        "field": ident.field,
        "units": list(UNIT_AXES[ident.field]),
        "unit_shape": list(ident.unit_shape),
        "n_instructions": ident.n,
        "n_per_category": by_category(ident.n_per_category),
        "n_groups_per_category": (None if ident.groups is None
                                  else by_category(units_per_category(ident.labels, ident.groups))),
        "per_category_count": by_category(ev.set_sizes(sets)),
        "unique": by_category(uniq["unique"]),
        "unique_ratio": by_category(uniq["unique_ratio"]),
        "general": gen["general"],
        "union": gen["union"],
        "general_share": gen["general_share"],
        "breadth_histogram": {str(k + 1): v for k, v in enumerate(gen["breadth_histogram"])},
        "overlap_jaccard": jac,
        "overlap_coefficient": coef,
        "per_layer": by_category(count),
        "per_layer_share": by_category(share),
        "union_per_layer": union_l,
        # NaN (shown as -) where general is undefined (fewer than two categories), not 0.
        "general_per_layer": (np.full(sets.shape[1], np.nan) if np.isnan(gen["general"])
                              else gen["general_mask"].reshape(sets.shape[1], -1).sum(1)),
        "phases": {**by_category([ev.locate_phases(p, n_perm, seed) for p in count]),
                   "union": ev.locate_phases(union_l, n_perm, seed)},
        "mean_instruction_set_size": by_category(mean_size),
        "mean_frequency": by_category(ident.category_mean.reshape(C, -1).mean(1)),
        "set_size_vs_length": _size_vs_length(ident),
        "instruction_overlap": None,
        "diagonal_dominance": None,
        "per_category_dominance": None,
    }
    if instruction_matrix is not None:
        block = ev.category_block_means(instruction_matrix, ident.labels)
        s["instruction_overlap"] = block
        s["diagonal_dominance"] = ev.diagonal_dominance(block)
        s["per_category_dominance"] = by_category(ev.per_category_dominance(block))
    if ident.field == "expert_routed":
        s["category_mean_frequency"] = by_category(ident.category_mean)
    if ident.field == "expert_neuron_active":
        s["per_expert"] = by_category(sets.sum(-1))
    return jsonable(s)


def _size_vs_length(ident: Identification) -> dict | None:
    """|S(I)| against T(I) (ev.size_vs_length) keyed by category name."""
    if ident.tokens is None:
        return None
    r = ev.size_vs_length(ident.instruction_size, ident.tokens, ident.labels)
    return jsonable({"spearman": r["spearman"], "per_category": by_category(r["per_category"]),
                     "tokens": r["tokens"], "set_size": r["set_size"],
                     "category": [CATEGORIES[c] for c in r["category"]]})


# The figures of field_summary that the `contrast` entry repeats for the contrast rule.
_CONTRAST_KEYS = ("per_category_count", "mean_instruction_set_size", "unique", "unique_ratio", "general",
                  "union", "per_layer", "overlap_jaccard")


def _rule(cfg: IdentifyConfig) -> dict:
    return {"identification": cfg.to_dict(), "supports": RULE_SUPPORT[cfg.rule]}


def contrast_summary(ident: Identification) -> dict:
    """The `contrast` entry of a section: set sizes under the contrast rule (no
    instruction-level overlap, no bootstrap, no per-instruction pairs: the
    contrast rule is for counting)."""
    s = field_summary(ident)
    svl = s["set_size_vs_length"]
    return {**_rule(ident.config), **{k: s[k] for k in _CONTRAST_KEYS},
            "set_size_vs_length": None if svl is None else {k: svl[k] for k in ("spearman", "per_category")}}


def _source_predicate(human: str | Callable[[str], bool]) -> tuple[Callable[[str], bool], str]:
    if callable(human):
        return human, getattr(human, "__name__", "custom predicate")
    return (lambda src: str(src).startswith(human)), f"source starts with {human!r}"


def subset_diagonal(
    instruction_matrix: np.ndarray, labels: np.ndarray, sources: Sequence[str],
    keep: str | Callable[[str], bool] = "human", *, n_perm: int = 999, seed: int = 0,
    groups: Sequence | None = None,
) -> dict | None:
    """The instruction-level diagonal on a subset of the records (e.g. human-written).

    Args:
      instruction_matrix: float [N, N] instruction Jaccard.
      labels: int [N] category indices.
      sources: length-N record sources.
      keep: a source prefix ("human" keeps sources starting with "human") or a
        predicate on the source string.
      n_perm: permutations of the subset's diagonal test (within its sources).
      seed: RNG seed.
      groups: optional length-N group keys: the test shuffles clusters (`permutation_test`).

    Returns:
      dict with rule, n, n_per_category, instruction_overlap [C, C],
      diagonal_dominance, per_category_dominance, permutation; None when no
      record passes.
    """
    pred, rule = _source_predicate(keep)
    idx = np.flatnonzero([pred(src) for src in sources])
    if idx.size == 0:
        return None
    sub, lab = instruction_matrix[np.ix_(idx, idx)], labels[idx]
    block = ev.category_block_means(sub, lab)
    perm = None
    if n_perm > 0:
        perm = permutation_test(sub, lab, n_perm=n_perm, seed=seed, strata=[sources[i] for i in idx],
                                groups=None if groups is None else [groups[i] for i in idx])
        perm["stratified_by"] = "source"
    return jsonable({
        "rule": rule, "n": int(idx.size), "n_per_category": by_category(np.bincount(lab, minlength=C)),
        "instruction_overlap": block, "diagonal_dominance": ev.diagonal_dominance(block),
        "per_category_dominance": by_category(ev.per_category_dominance(block)), "permutation": perm,
    })


def between_groups(
    instruction_matrix: np.ndarray, labels: np.ndarray, groups: Sequence, *, n_perm: int = 999, seed: int = 0,
    strata: Sequence | None = None, n_boot: int = 0, ci: float = 0.95,
) -> dict | None:
    """The instruction-level diagonal without the pairs of records that share an instruction.

    Records of one category with one group key (templated variants of one
    instruction) share most of their tokens, so their pairs raise the diagonal
    through shared text alone. Here those within-group pairs are left out of
    every block mean, and the permutation test shuffles whole groups (within
    `strata`), so its statistic and its null both compare distinct groups only:
    the question is whether different instructions of one category share more
    units than instructions of different categories. The bootstrap draws whole
    groups (`instruction_bootstrap`: the draws of the main bootstrap for the same
    seed when it resamples groups), and a replicate's block means leave out
    every pair of records of one group, the pairs between two drawn copies of a
    group included.

    Args:
      instruction_matrix: float [N, N] instruction Jaccard.
      labels: int [N] category indices.
      groups: length-N group keys (`cluster_index`).
      n_perm: permutations (0 = none).
      seed: RNG seed.
      strata: optional length-N strata of the test (record sources).
      n_boot: bootstrap replicates (0 = none).
      ci: bootstrap interval coverage.

    Returns:
      dict with n_groups and within_group_pairs (per category: unordered pairs of
      records sharing a group), within_group_jaccard (per category: their mean
      Jaccard), instruction_overlap [C, C], diagonal_dominance,
      per_category_dominance, permutation and bootstrap (intervals, bias and
      outside flags of instruction_overlap, diagonal_dominance and
      per_category_dominance, as in `bootstrap`; None without replicates); None
      when no two records share a group.
    """
    clusters = cluster_index(labels, groups)
    same = clusters[:, None] == clusters[None]
    np.fill_diagonal(same, False)
    if not same.any():
        return None
    # A copy in the matrix's own float32 (pair_terms reads it in float64 as it reads the matrix):
    # float64 held 8 N^2 bytes more, beside the N^2 float64 pair terms of the tests below.
    m = np.array(instruction_matrix, dtype=np.result_type(instruction_matrix, np.float32))
    rows, cols = np.nonzero(np.triu(same))
    pair_cat = labels[rows]
    within = m[rows, cols]
    m[same] = np.nan  # a NaN pair is left out of every block mean (pair_terms)
    block = ev.category_block_means(m, labels)
    perm = None
    if n_perm > 0:
        perm = permutation_test(m, labels, n_perm=n_perm, seed=seed, strata=strata, groups=groups)
        perm["stratified_by"] = None if strata is None else "source"
    boot = instruction_bootstrap(m, labels, groups, n_boot=n_boot, seed=seed, ci=ci) if n_boot > 0 else None
    return jsonable({
        "n_groups": by_category(units_per_category(labels, groups)),
        "within_group_pairs": by_category(np.bincount(pair_cat, minlength=C)),
        "within_group_jaccard": by_category([nan_mean(within[pair_cat == c]) for c in range(C)]),
        "instruction_overlap": block, "diagonal_dominance": ev.diagonal_dominance(block),
        "per_category_dominance": by_category(ev.per_category_dominance(block)), "permutation": perm,
        "bootstrap": boot,
    })


# Prompt-length bins of the length-matched permutation test: quintiles of T(I).
LENGTH_BINS = 5


def length_bins(tokens: np.ndarray, n_bins: int = LENGTH_BINS) -> np.ndarray:
    """int [N] quantile bin of each record's counted tokens T(I), numbered 0, 1, ... from
    the shortest; equal lengths always share a bin (edges are the 1/n_bins, ... quantiles,
    a record goes above every edge it is not below), so with many ties there are fewer."""
    t = np.asarray(tokens, np.float64)
    if t.size == 0:
        return np.zeros(0, np.int64)
    edges = np.quantile(t, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    return np.unique(np.searchsorted(edges, t, side="right"), return_inverse=True)[1].ravel()


def length_matched(instruction_matrix: np.ndarray, labels: np.ndarray, tokens: np.ndarray, *,
                   n_perm: int = 999, seed: int = 0, sources: Sequence | None = None,
                   groups: Sequence | None = None) -> dict:
    """The diagonal's permutation test with labels shuffled only among records of similar
    prompt length (`length_bins`, within sources when given; groups move whole).

    Categories differ in prompt length (a summary's input is long, a question short) and
    records of similar length can share units through length alone, so a free shuffle's
    null lacks that part of the diagonal. Here the null keeps each length bin's category
    mix: a null mean above the free test's is what length alone gives.

    Args:
      instruction_matrix: float [N, N] instruction Jaccard.
      labels: int [N] category indices.
      tokens: int [N] counted tokens T(I).
      n_perm: permutations.
      seed: RNG seed.
      sources: optional length-N record sources (strata beside the length bins).
      groups: optional length-N group keys (`permutation_test`).

    Returns:
      `permutation_test`'s dict plus stratified_by, n_bins and per_bin (per length bin
      {category: records}: where categories barely share a bin the test has little room).
    """
    bins = length_bins(tokens)
    strata = bins.tolist() if sources is None else list(zip(sources, bins.tolist()))
    perm = permutation_test(instruction_matrix, labels, n_perm=n_perm, seed=seed, strata=strata, groups=groups)
    perm["stratified_by"] = "prompt length" + ("" if sources is None else " and source")
    perm["n_bins"] = int(bins.max()) + 1 if bins.size else 0
    perm["per_bin"] = [by_category(np.bincount(labels[bins == b], minlength=C)) for b in range(perm["n_bins"])]
    return jsonable(perm)


def analyze_field(
    counts: Counts, field: str, cfg: IdentifyConfig, *,
    n_boot: int = 100, n_perm: int = 999, seed: int = 0, ci: float = 0.95, resample: str = "group",
    instruction_level: bool = True, keep_instruction_sets: bool = False, packed: bool | None = None,
    contrast: bool = True, human: str | Callable[[str], bool] | None = "human",
    top_units: int = 20, top_per_unit: int = 5,
) -> FieldAnalysis:
    """Identify and evaluate one count field.

    Args:
      counts: the model's counts (numpy or lazily-read arrays) with categories.
      field: the count field.
      cfg: identification rule.
      n_boot: bootstrap replicates (0 = none).
      n_perm: permutations for the diagonal test, and layer-order shuffles of the phase fits (0 = none).
      seed: seed of bootstrap and permutations.
      ci: bootstrap interval coverage.
      resample: "group": the bootstrap draws, and the permutation tests shuffle,
        clusters of records sharing a group key (`Counts.groups`; records when the
        counts carry none, and the summary says "record"); "record": every record
        on its own. The `between_groups` entry always draws and shuffles whole groups.
      instruction_level: compute the N x N instruction Jaccard.
      keep_instruction_sets: keep S(I) after the analysis (memory: N x U bools).
      packed: hold S(I) bit-packed while analysing (8x less memory); None packs
        when the unpacked sets would exceed 1 GiB.
      contrast: also identify with the contrast rule (`contrast_config(cfg)`:
        absolute threshold beside top-eps) in the same pass over the counts.
      human: the subset whose diagonal is reported beside the full set when the
        counts carry sources: a source prefix ("human": sources starting with
        "human"), a predicate on the source, or None for no subset.
      top_units: units listed per category with their top instructions (0 = none).
      top_per_unit: instructions listed per unit.
    """
    if resample not in ("group", "record"):
        raise ValueError(f"resample={resample!r}: use 'group' (records sharing an instruction move together) "
                         "or 'record'")
    need_sets = instruction_level or keep_instruction_sets or (
        n_boot > 0 and cfg.aggregation == "consensus")
    if packed is None:
        shape = getattr(counts, field).shape
        packed = int(np.prod(shape, dtype=np.int64)) > _PACK_ABOVE
    cfgs = [cfg, contrast_config(cfg)] if contrast else [cfg]
    if cfg.ties == "break":  # the same rule with ties kept: how much set sizes followed length without the break
        cfgs.append(dataclasses.replace(cfg, ties="keep"))
    idents = identify_all(counts, field, cfgs, keep_instruction_sets=[need_sets] + [False] * (len(cfgs) - 1),
                          packed=packed)
    ident = idents[0]
    jmat = ev.instruction_jaccard(ident) if instruction_level else None
    summary = field_summary(ident, jmat, n_perm=n_perm, seed=seed)
    summary["contrast"] = contrast_summary(idents[1]) if contrast else None
    if cfg.ties == "break" and summary["set_size_vs_length"] is not None:
        kept = _size_vs_length(idents[-1])
        summary["set_size_vs_length"]["ties_kept"] = {k: kept[k] for k in ("spearman", "per_category", "set_size")}
    summary["bootstrap"] = summary["permutation"] = summary["human_subset"] = summary["between_groups"] = None
    summary["length_matched"] = None
    groups = ident.groups if resample == "group" else None
    rep_sets = weights = None
    if n_boot > 0:
        boot = bootstrap(ident, counts=counts, instruction_matrix=jmat, n_boot=n_boot, seed=seed, ci=ci,
                         groups=groups, keep_sets=True)
        rep_sets, weights = boot.pop("replicate_sets"), boot.pop("weights")
        summary["bootstrap"] = jsonable(boot)
    if n_perm > 0 and jmat is not None:
        perm = permutation_test(jmat, ident.labels, n_perm=n_perm, seed=seed, strata=ident.sources, groups=groups)
        perm["stratified_by"] = None if ident.sources is None else "source"
        summary["permutation"] = jsonable(perm)
    if n_perm > 0 and jmat is not None and ident.tokens is not None:
        summary["length_matched"] = length_matched(jmat, ident.labels, ident.tokens, n_perm=n_perm, seed=seed,
                                                   sources=ident.sources, groups=groups)
    if jmat is not None and ident.sources is not None and human is not None:
        summary["human_subset"] = subset_diagonal(jmat, ident.labels, ident.sources, human,
                                                  n_perm=n_perm, seed=seed, groups=groups)
    if jmat is not None and ident.groups is not None:
        summary["between_groups"] = between_groups(jmat, ident.labels, ident.groups, n_perm=n_perm, seed=seed,
                                                   strata=ident.sources, n_boot=n_boot, ci=ci)
    summary["top_instructions"] = (jsonable(top_instructions(
        counts, ident, units_per_category=top_units, top=top_per_unit)) if top_units > 0 else None)
    if not keep_instruction_sets:
        ident.drop_instruction_sets()
    return FieldAnalysis(ident=ident, instruction_matrix=jmat, summary=summary,
                         contrast=idents[1] if contrast else None, replicate_sets=rep_sets, boot_weights=weights)


def analyze_model(
    counts: Counts, cfg: IdentifyConfig | None = None, *, name: str = "model",
    fields: Sequence[str] | None = None, instruction_level: bool | Sequence[str] = True, **field_kw,
) -> ModelAnalysis:
    """Identification and evaluation of every count field a model has.

    Args:
      counts: the model's counts (numpy or lazily-read arrays) with categories.
      cfg: identification rule (default IdentifyConfig()).
      name: model name used in the summary.
      fields: count fields to analyse (default: all present).
      instruction_level: compute the N x N instruction Jaccard (True, False, or
        the fields to do it for; expert neurons of big MoE models are costly).
      **field_kw: analyze_field's options, the same for every field (n_boot,
        n_perm, seed, ci, resample, keep_instruction_sets, packed, contrast, human,
        top_units, top_per_unit).

    Returns:
      A ModelAnalysis; `.summary()` gives `models.<name>`.
    """
    check_inputs(counts, cfg, "analyze_model")
    unknown = sorted(set(field_kw) - set(inspect.signature(analyze_field).parameters))
    if unknown:
        rule_keys = [k for k in unknown if k in {f.name for f in dataclasses.fields(IdentifyConfig)}]
        fix = (f"{', '.join(rule_keys)} belong(s) to the rule: pass sj.IdentifyConfig("
               f"{', '.join(f'{k}={field_kw[k]!r}' for k in rule_keys)}) as the second argument" if rule_keys
               else "see help(sparcom_jax.analysis.analyze_field) for the options")
        raise TypeError(f"analyze_model got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; {fix}")
    cfg = cfg or IdentifyConfig()
    fields = list(fields) if fields is not None else list(counts.arrays())
    for f in fields:
        check_field(counts, f, "analyze_model")
    out = {}
    for f in fields:
        inst = instruction_level if isinstance(instruction_level, bool) else f in instruction_level
        out[SECTIONS[f]] = analyze_field(counts, f, cfg, instruction_level=inst, **field_kw)
    return ModelAnalysis(name=name, config=cfg, fields=out, meta=dict(counts.meta or {}))


def _as_analysis(x, cfg, name, kw) -> ModelAnalysis:
    if isinstance(x, ModelAnalysis):
        return x
    return analyze_model(x, cfg, name=name, **kw)


def _moves(sb: dict, sa: dict) -> dict:
    """How the model-level figures of one section move from before to after (undefined = NaN)."""
    def ba(before, after):
        before, after = (np.nan if v is None else v for v in (before, after))
        return {"before": before, "after": after, "delta": after - before}

    def mat_delta(key):
        if sb.get(key) is None or sa.get(key) is None:
            return None
        return np.asarray(sa[key], float) - np.asarray(sb[key], float)

    return {
        **{k: ba(sb[k], sa[k]) for k in ("general", "union", "general_share", "diagonal_dominance")},
        **{k: {c: ba(sb[k][c], sa[k][c]) for c in CATEGORIES}
           for k in ("per_category_count", "unique", "unique_ratio")},
        "per_layer_delta": {c: np.asarray(sa["per_layer"][c]) - np.asarray(sb["per_layer"][c])
                            for c in CATEGORIES},
        "phases": {k: {"before": sb["phases"][k]["boundaries"], "after": sa["phases"][k]["boundaries"]}
                   for k in sb["phases"]},
        "overlap_jaccard_delta": mat_delta("overlap_jaccard"),
        "instruction_overlap_delta": mat_delta("instruction_overlap"),
    }


def _same_draws(*fields: FieldAnalysis) -> bool:
    """Whether every field was bootstrapped with the same draws (same records, n_boot, seed and
    resampling unit), so that their replicates pair up."""
    w = [f.boot_weights for f in fields]
    return all(f.replicate_sets is not None and x is not None and x.shape == w[0].shape
               and np.array_equal(x, w[0]) for f, x in zip(fields, w))


def _draws_entry(f: FieldAnalysis) -> dict:
    b = f.summary["bootstrap"]
    return {"n_boot": b["n_boot"], "seed": b["seed"], "ci": b["ci"], "unit": b["unit"], "paired": True}


def _paired_bootstrap(fb: FieldAnalysis, fa: FieldAnalysis) -> dict | None:
    """Intervals of retained / gained / lost / Jaccard from the two models' replicates, paired
    by draw; None unless both were bootstrapped with the same draws."""
    if not _same_draws(fb, fa):
        return None
    r = paired_set_intervals(fb.ident.category_sets, fa.ident.category_sets, fb.replicate_sets,
                             fa.replicate_sets, fb.summary["bootstrap"]["ci"])
    return {**_draws_entry(fb), **{k: r[k] for k in cmp.SET_KEYS}}


def _series_bootstrap(fields: Sequence[FieldAnalysis]) -> dict | None:
    """Paired intervals of a series' trends at every checkpoint and of their change from the first
    to the last checkpoint (`series_figures`, `series_dominance`: replicate r of every checkpoint
    rebuilt from one draw of instructions); None unless every checkpoint was bootstrapped with
    the same draws."""
    if not _same_draws(*fields):
        return None
    f0 = fields[0]
    sets = [f.ident.category_sets for f in fields]
    mats = [f.instruction_matrix for f in fields]
    extra = series_dominance(mats, f0.ident.labels, f0.boot_weights) if all(m is not None for m in mats) else None
    est, r = paired_intervals(sets, [f.replicate_sets for f in fields],
                              functools.partial(series_figures, present=f0.ident.n_per_category > 0),
                              f0.summary["bootstrap"]["ci"], extra)

    def shaped(v, per_category: bool):
        v = np.asarray(v)
        if not per_category:
            return v
        return {c: v[..., i] for i, c in enumerate(CATEGORIES)}

    out: dict[str, Any] = {**_draws_entry(f0), "per_checkpoint": {}, "change": {}}
    for k, v in r.items():
        if k == "n_outside":
            continue
        if k.startswith("change_"):
            cat = np.ndim(est[k]) == 1
            out["change"][k[len("change_"):]] = {"estimate": shaped(est[k], cat),
                                                 **{p: shaped(x, cat) for p, x in v.items()}}
        else:
            out["per_checkpoint"][k] = {p: shaped(x, np.ndim(x) == 2)
                                        for p, x in v.items()}
    out["n_outside"] = r["n_outside"]
    return out


def compare_fields(fb: FieldAnalysis, fa: FieldAnalysis) -> tuple[dict, dict]:
    """({category: comparison}, model-level moves) for one section of two models."""
    ib, ia = fb.ident, fa.ident
    sets = cmp.compare_sets(ib.category_sets, ia.category_sets)
    boot = _paired_bootstrap(fb, fa)
    shift = cmp.frequency_shift(ib.category_mean, ia.category_mean, ib.category_sets, ia.category_sets)
    both = fb.contrast is not None and fa.contrast is not None
    csets = cmp.compare_sets(fb.contrast.category_sets, fa.contrast.category_sets) if both else None
    per_cat = {}
    for i, c in enumerate(CATEGORIES):
        per_cat[c] = {
            "n_instructions": int(ib.n_per_category[i]),  # 0: the category was not measured
            **{k: sets[k][i] for k in cmp.SET_KEYS},
            "per_layer": {k[len("per_layer_"):]: v[i] for k, v in sets.items() if k.startswith("per_layer_")},
            "frequency_shift": {k: v[i] for k, v in shift.items()},
            "contrast": {k: csets[k][i] for k in cmp.SET_KEYS} if both else None,
            "bootstrap": None if boot is None else {
                **{k: boot[k] for k in ("n_boot", "seed", "ci", "unit", "paired")},
                **{k: {part: v[i] for part, v in boot[k].items()} for k in cmp.SET_KEYS}},
        }
    return jsonable(per_cat), jsonable(_moves(fb.summary, fa.summary))


def rules_entry(cfg: IdentifyConfig, contrast: bool = True) -> dict:
    """What the main and the contrast rule are and which finding each supports."""
    return {"main": _rule(cfg), "contrast": _rule(contrast_config(cfg)) if contrast else None}


# What two compared models must share: a difference here changes counts by itself (bfloat16
# flips gate signs near 0, so a float32 base against a bfloat16 tuned model mixes in precision).
_COMPARABLE = ("scope", "max_length", "dtype", "gate_dtype")


def check_comparable(analyses: Sequence[ModelAnalysis]) -> None:
    """Refuse to compare models identified with different rules (`IdentifyConfig`, all but
    its chunk), counted on different records (by id, or by number where ids are missing),
    token scopes, max lengths or precisions (compute and gate dtype), models with no kind
    of unit in common, or, under scope "content", models that counted different numbers
    of content tokens of a record.

    Templates may differ (that is what a base-vs-chat comparison does; the report
    names them and shows the same-template control beside it). Under scope "content"
    both models must count the same instruction/input tokens; the counted tokens T(I)
    of a record differ when max_length cut a longer template's content further and the
    counts were made without the study's content caps.

    Raises:
      ValueError: naming the two models, what differs and the fix.
    """
    first = analyses[0]
    for other in analyses[1:]:
        if other.config != first.config:
            a, b = first.config.to_dict(), other.config.to_dict()
            differ = ", ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
            raise ValueError(f"{first.name!r} and {other.name!r} were identified with different rules ({differ}); "
                             "analyse them with one IdentifyConfig")
    ids0 = next((f.ident.ids for f in first.fields.values()), None)
    tokens0 = next((f.ident.tokens for f in first.fields.values()), None)
    for other in analyses[1:]:
        for key in _COMPARABLE:
            a, b = first.meta.get(key), other.meta.get(key)
            if a is not None and b is not None and a != b:
                raise ValueError(f"{first.name!r} and {other.name!r} were counted with different {key} "
                                 f"({a!r} vs {b!r}); compare models counted with the same {key} "
                                 "(collect one of them again)")
        if not set(first.fields) & set(other.fields):
            raise ValueError(f"{first.name!r} ({', '.join(first.fields)}) and {other.name!r} "
                             f"({', '.join(other.fields)}) have no kind of unit in common, so there is "
                             "nothing to compare; compare models of one architecture family (dense with "
                             "dense, MoE with MoE)")
        for sec in [sec for sec in first.fields if sec in other.fields]:
            a, b = first[sec].ident.unit_shape, other[sec].ident.unit_shape
            if a != b:
                def arch(m, shape):
                    kind = m.meta.get("model_type")
                    return f"{m.name!r} ({kind + ', ' if kind else ''}{sec} [{', '.join(map(str, shape))}])"
                raise ValueError(f"{arch(first, a)} and {arch(other, b)} differ in units: no unit of one "
                                 "is a unit of the other; compare a fine-tuned model with the model it was "
                                 "fine-tuned from (same family, layers and widths)")
        ids = next((f.ident.ids for f in other.fields.values()), None)
        tokens = next((f.ident.tokens for f in other.fields.values()), None)
        if (ids0 is None or ids is None) and tokens0 is not None and tokens is not None \
                and len(tokens0) != len(tokens):  # without record ids, the record count still tells
            raise ValueError(f"{first.name!r} and {other.name!r} were counted on different records "
                             f"({len(tokens0)} vs {len(tokens)} records); compare models counted on the same "
                             "records (collect one of them again)")
        if ids0 is not None and ids is not None and list(ids0) != list(ids):
            n = len(set(ids0) ^ set(ids))
            raise ValueError(f"{first.name!r} and {other.name!r} were counted on different records "
                             f"({len(ids0)} vs {len(ids)} records, {n} not in both, or in another order); "
                             "compare models counted on the same records (collect one of them again)")
        content = first.meta.get("scope") == other.meta.get("scope") == "content"
        if content and tokens0 is not None and tokens is not None and len(tokens0) == len(tokens):
            differ = np.asarray(tokens0) != np.asarray(tokens)
            if differ.any():
                raise ValueError(
                    f"{first.name!r} and {other.name!r} counted different numbers of instruction/input tokens "
                    f"on {int(differ.sum())} of {len(differ)} records (scope 'content'), so they did not count "
                    "the same text: max_length cut one template's content further (a longer header keeps "
                    "fewer content tokens), or the tokenizers split the text differently; collect both with "
                    "the same content caps (the pipeline's collect stage does; in Python pass "
                    "content_caps=sparcom_jax.content_caps(records, [(tokenizer, template), ...], "
                    "max_length=...) to collect_instructions) or raise max_length")


class Comparison(dict):
    """The `compare_models` dict (keys in its docstring), displayed as its headline figures.

    A plain dict in every other way (JSON-safe, `build_summary(comparison=...)`); only its
    repr differs, because a notebook cell would otherwise print every per-layer list (about
    9,000 characters for a 2-layer model).
    """

    def __repr__(self) -> str:
        rule = IdentifyConfig.from_dict(self["rules"]["main"]["identification"]).describe()
        lines = [f"Comparison {self['before']!r} -> {self['after']!r}: {rule}"]
        rows = (("size_before", "|S(c)| before"), ("size_after", "|S(c)| after"), ("retained", "retained"),
                ("gained", "gained"), ("lost", "lost"))
        for sec, moves in self["moves"].items():
            per = self[sec]
            absent = absent_categories({c: per[c].get("n_instructions") for c in CATEGORIES})
            lines.append(f"  {sec}")
            lines += [f"    {label:<17} {per_category_text({c: per[c][key] for c in CATEGORIES}, absent)}"
                      for key, label in rows]
            lines.append(f"    {'jaccard':<17} "
                         f"{per_category_text({c: _num(per[c]['jaccard']) for c in CATEGORIES}, absent)}")
            if absent:
                lines.append(f"    {'no instructions':<17} {', '.join(SHORT_NAMES[c] for c in absent)} (shown as -)")
            diag = moves["diagonal_dominance"]
            if diag["before"] is not None or diag["after"] is not None:
                lines.append(f"    {'diagonal':<17} {_num(diag['before'])} -> {_num(diag['after'])}")
            if all(per[c].get("contrast") for c in CATEGORIES):
                sizes = {c: f"{per[c]['contrast']['size_before']}->{per[c]['contrast']['size_after']}"
                         for c in CATEGORIES}
                contrast = IdentifyConfig.from_dict(self["rules"]["contrast"]["identification"]).describe()
                lines.append(f"    {'|S(c)| contrast':<17} {per_category_text(sizes, absent)} ({contrast})")
        lines.append("  every number: the dict's keys (docs/analysis.md)")
        return "\n".join(lines)


def compare_models(
    before: ModelAnalysis | Counts, after: ModelAnalysis | Counts, cfg: IdentifyConfig | None = None,
    *, names: tuple[str, str] = ("before", "after"), **analyze_kw,
) -> dict:
    """Before/after comparison of every section both models have.

    Args:
      before, after: ModelAnalysis, or Counts to analyse with `cfg`.
      cfg: rule used when Counts are given.
      names: model names used when Counts are given.
      **analyze_kw: passed to analyze_model for Counts.

    Returns:
      The `comparison` dict (a `Comparison`, which displays its headline figures):
      before, after (names), "<section>": {category: {n_instructions (the same records
      in both), size_before, size_after, retained, gained, lost, jaccard, per_layer, frequency_shift, contrast:
      {size_before, size_after, retained, gained, lost, jaccard} under the
      contrast rule (None when not run), bootstrap: paired intervals of those six
      figures (`_paired_bootstrap`; None unless both models were resampled with the
      same draws)}}, "moves":
      {"<section>": model-level changes}, and "rules" (rules_entry).
    """
    mb = _as_analysis(before, cfg, names[0], analyze_kw)
    ma = _as_analysis(after, cfg, names[1], analyze_kw)
    check_comparable([mb, ma])
    has_contrast = any(f.contrast is not None for f in mb.fields.values())
    out = Comparison({"before": mb.name, "after": ma.name, "moves": {},
                      "rules": rules_entry(mb.config, has_contrast)})
    for sec in mb.fields:
        if sec in ma.fields:
            out[sec], out["moves"][sec] = compare_fields(mb[sec], ma[sec])
    return out


# Figures whose difference between the main comparison and the same-template control is reported.
TEMPLATE_EFFECT_KEYS = ("retained", "gained", "lost", "jaccard")


def _template_effect(fb: FieldAnalysis, fm: FieldAnalysis, fs: FieldAnalysis) -> dict[str, dict]:
    """{category: template_effect entry} for one section (`same_template_control`)."""
    def figures(sets):
        main, same = set_figures(sets[0], sets[1]), set_figures(sets[0], sets[2])
        return {k: main[k] - same[k] for k in TEMPLATE_EFFECT_KEYS}

    estimates = [f.ident.category_sets for f in (fb, fm, fs)]
    paired = _same_draws(fb, fm, fs)
    if paired:
        est, r = paired_intervals(estimates, [f.replicate_sets for f in (fb, fm, fs)], figures,
                                  fb.summary["bootstrap"]["ci"])
    else:
        est, r = figures([x.reshape(C, -1) for x in estimates]), {}
    draws = _draws_entry(fb) if paired else {"n_boot": None, "seed": None, "ci": None, "unit": None,
                                              "paired": False}
    none = dict.fromkeys(("low", "high", "bias", "outside"))
    return jsonable({c: {**draws, **{k: {"estimate": est[k][i], **({p: v[i] for p, v in r[k].items()} if paired
                                                                   else none)}
                                     for k in TEMPLATE_EFFECT_KEYS}}
                     for i, c in enumerate(CATEGORIES)})


def same_template_control(base: ModelAnalysis, tuned: ModelAnalysis, tuned_same: ModelAnalysis) -> dict:
    """The same-template control: base against the tuned model counted under the base model's
    template, and how far the main comparison (base against the tuned model under its own
    template) lies from it.

    Args:
      base: the base model's analysis (its own template).
      tuned: the tuned model under its own template (the main comparison's after).
      tuned_same: the tuned model counted under the base model's template.

    Returns:
      `compare_models(base, tuned_same)` whose every category entry also has
      `template_effect`: {n_boot, seed, ci, unit, paired, and per figure of
      TEMPLATE_EFFECT_KEYS {estimate, low, high, bias, outside}}, the main comparison's
      figure minus the control's (e.g. Jaccard(base, tuned) - Jaccard(base, tuned_same));
      the interval is paired (replicate r of all three models from one draw of
      instructions) when all three were bootstrapped with the same draws, else
      low ... outside are None and paired is False.
    """
    out = compare_models(base, tuned_same)
    for sec in out["moves"]:
        if sec in tuned.fields:
            for c, eff in _template_effect(base[sec], tuned[sec], tuned_same[sec]).items():
                out[sec][c]["template_effect"] = eff
    return out


class SeriesComparison(dict):
    """The `compare_series` dict (keys in its docstring), displayed as its trends: per section
    |S(c)|, the Jaccard with the first checkpoint and the diagonal along the checkpoints.
    Otherwise a plain dict, like `Comparison`."""

    def __repr__(self) -> str:
        def path(values) -> str:
            return "->".join(str(v) if isinstance(v, int) else _num(v) for v in values)  # None: n/a

        names = self["names"]
        lines = [f"SeriesComparison over {len(names)} checkpoints: {', '.join(names)}"]
        for sec, t in self.items():
            if sec == "names":
                continue
            absent = absent_categories(t.get("n_instructions") or {})  # absent in a dict of an earlier version
            lines += [f"  {sec}",
                      f"    {'|S(c)|':<17} "
                      f"{per_category_text({c: path(v) for c, v in t['per_category_count'].items()}, absent)}",
                      f"    {'jaccard vs first':<17} "
                      f"{per_category_text({c: path(v) for c, v in t['vs_base']['jaccard'].items()}, absent)}",
                      f"    {'diagonal':<17} {path(t['diagonal_dominance'])}"]
            if absent:
                lines.append(f"    {'no instructions':<17} {', '.join(SHORT_NAMES[c] for c in absent)} (shown as -)")
        lines.append("  every number: the dict's keys (docs/analysis.md)")
        return "\n".join(lines)


def compare_series(
    items: Iterable[ModelAnalysis | tuple[str, ModelAnalysis | Counts]], cfg: IdentifyConfig | None = None,
    **analyze_kw,
) -> dict:
    """The comparison figures along a series of checkpoints (first = base).

    Args:
      items: in training order, each a ModelAnalysis (under its name) or a (name,
        ModelAnalysis or Counts) pair; names must differ.
      cfg: rule used when Counts are given.
      **analyze_kw: passed to analyze_model for Counts.

    Returns:
      A `SeriesComparison` (a dict that displays its trends): {"names": [S],
      "<section>": trends}, where n_instructions is {category: records} (the same
      records at every checkpoint; 0: the category was not measured, and its figures
      say nothing: displayed as -) and each trend is a list over the series (per
      category where it applies): per_category_count, unique,
      unique_ratio, general, general_share, union, diagonal_dominance,
      mean_frequency, per_layer ([S][L] per category), phases (boundaries),
      vs_base / vs_previous {retained, gained, lost, jaccard} (the first
      entry of vs_previous is None), and contrast_per_category_count /
      contrast_mean_instruction_set_size (the contrast rule's sizes; None
      when a checkpoint has no contrast identification), and bootstrap: the
      paired intervals of the trends per checkpoint and of their change from
      first to last (`_series_bootstrap`; None unless every checkpoint was
      resampled with the same draws).
    """
    items = [(x.name, x) if isinstance(x, ModelAnalysis) else x for x in items]
    if not items:
        raise ValueError("an empty series")
    for i, x in enumerate(items):
        if not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)):
            raise TypeError(f"compare_series: item {i} is a {type(x).__name__}; give each checkpoint as a "
                            "ModelAnalysis (named by analyze_model(name=...)) or a (name, ModelAnalysis or "
                            "Counts) pair, in training order")
    names = [n for n, _ in items]
    if len(set(names)) < len(names):
        raise ValueError(f"compare_series: checkpoint names repeat ({names}); name each analysis "
                         "(analyze_model(..., name='step500')) or pass (name, analysis) pairs")
    analyses = [_as_analysis(x, cfg, n, analyze_kw) for n, x in items]
    check_comparable(analyses)
    out: dict[str, Any] = {"names": names}
    sections = [s for s in analyses[0].fields if all(s in a.fields for a in analyses)]
    keys = ("retained", "gained", "lost", "jaccard")
    for sec in sections:
        sums = [a[sec].summary for a in analyses]
        # The same records at every checkpoint (check_comparable): 0 marks a category not measured.
        t: dict[str, Any] = {"n_instructions": by_category(analyses[0][sec].ident.n_per_category)}
        for k in ("per_category_count", "unique", "unique_ratio", "mean_frequency", "per_layer"):
            t[k] = {c: [s[k][c] for s in sums] for c in CATEGORIES}
        for k in ("general", "general_share", "union", "diagonal_dominance"):
            t[k] = [s[k] for s in sums]
        t["phases"] = {c: [s["phases"][c]["boundaries"] for s in sums] for c in (*CATEGORIES, "union")}
        sets = [a[sec].ident.category_sets for a in analyses]
        for name, refs in (("vs_base", sets[:1] * len(sets)), ("vs_previous", [None, *sets[:-1]])):
            r = [None if ref is None else cmp.compare_sets(ref, cur) for ref, cur in zip(refs, sets)]
            t[name] = {k: {c: [None if x is None else x[k][i] for x in r] for i, c in enumerate(CATEGORIES)}
                       for k in keys}
        for k in ("per_category_count", "mean_instruction_set_size"):
            t[f"contrast_{k}"] = (None if any(s.get("contrast") is None for s in sums)
                                  else {c: [s["contrast"][k][c] for s in sums] for c in CATEGORIES})
        t["bootstrap"] = _series_bootstrap([a[sec] for a in analyses])
        out[sec] = t
    return SeriesComparison(jsonable(out))


def build_summary(
    models: Mapping[str, ModelAnalysis] | Sequence[ModelAnalysis], *,
    config: IdentifyConfig | None = None,
    comparison: dict | None = None,
    series: dict | None = None,
    ablation: AblationResult | None = None,
    ablation_experts: AblationResult | None = None,
    ablation_expert_neurons: AblationResult | None = None,
    model_paths: Mapping[str, str] | None = None,
    data: Any = None,
    scope: str | None = None,
    templates: Mapping[str, str | None] | None = None,
    controls: Mapping[str, dict] | None = None,
    precision: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Assemble summary.json.

    Args:
      models: analysed models (a mapping name -> analysis, or a list).
      config: the identification rule (default: the models' rule).
      comparison: compare_models output.
      series: compare_series output.
      ablation: neuron ablation result (-> ablation.isn, ablation.random).
      ablation_experts: expert ablation result (-> ablation.ise, ablation.ise_random).
      ablation_expert_neurons: expert-neuron ablation result (-> ablation.expert_neurons).
      model_paths: {name: checkpoint path}.
      data: description of the instruction data (path, counts, source...).
      scope: token scope ("prompt", "response", "all", ...).
      templates: {model name: prompt template it was counted with}.
      controls: extra comparisons shown beside the main one, each a
        compare_models output; "same_template" = the tuned model counted under
        the base model's template, compared with the base.
      precision: {label: {category: set Jaccard of bfloat16 vs float32 counts}}
        (e.g. label "isn", "ise"); other values (a note) are kept as they are.
      extra: more top-level keys.

    Returns:
      JSON-safe dict.
    """
    if not isinstance(models, Mapping):
        models = {m.name: m for m in models}
    configs = {m.config for m in models.values()}
    if config is None:
        if len(configs) != 1:
            raise ValueError("models were identified with different rules; pass config=")
        config = configs.pop()
    elif configs and configs != {config}:
        raise ValueError("config differs from the rule the models were identified with")
    out: dict[str, Any] = {
        "summary_version": SUMMARY_VERSION,
        "categories": list(CATEGORIES),
        "short_names": dict(SHORT_NAMES),
        "identification": config.to_dict(),
        "model_paths": dict(model_paths or {}),
        "data": data,
        "scope": scope,
        "templates": dict(templates or {}),
        "rule_support": dict(RULE_SUPPORT),
        "models": {name: m.summary() for name, m in models.items()},
    }
    if controls:
        out["controls"] = dict(controls)
    if precision:
        out["precision"] = dict(precision)
    if comparison is not None:
        out["comparison"] = comparison
    if series is not None:
        out["series"] = series
    ab: dict[str, Any] = {}
    for res, own, rand, kind in ((ablation, "isn", "random", "neurons"),
                                 (ablation_experts, "ise", "ise_random", "experts")):
        if res is not None:
            d = res.to_dict()
            ab.update({own: d["isn"], rand: d["random"], kind: d})
    if ablation_expert_neurons is not None:
        ab["expert_neurons"] = ablation_expert_neurons.to_dict()
    if ab:
        out["ablation"] = ab
    out.update(extra or {})
    return jsonable(out)
