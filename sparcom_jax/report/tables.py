"""CSV tables derived from summary.json: one Table per file, all JSON-derived."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator

from sparcom_jax.analysis.common import SECTIONS
from sparcom_jax.analysis.compare import SET_KEYS
from sparcom_jax.categories import CATEGORIES, SHORT_NAMES, absent_categories

SHORT = [SHORT_NAMES[c] for c in CATEGORIES]
ABLATION_CORNER = "ablated \\ evaluated"
# What the bootstrap gives per figure: the percentile interval, the bias (mean replicate minus
# the estimate) and whether the estimate lies outside its interval.
BOOT_PARTS = ("low", "high", "bias", "outside")


@dataclasses.dataclass
class Table:
    """A named table: written as `<name>.csv`."""

    name: str
    header: list[str]
    rows: list[list[Any]]


def safe_name(name: str) -> str:
    """A string usable in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "model"


def matrix_table(name: str, m, corner: str = "category") -> Table:
    """A [C, C] matrix with category rows and short-name columns."""
    return Table(name, [corner, *SHORT], [[c, *row] for c, row in zip(CATEGORIES, m)])


def interval(s: dict, key: str, i: int | None = None) -> list:
    """[low, high] of the bootstrap interval of a section's figure `key` (its entry i for a
    per-category figure), or [None, None] without a bootstrap."""
    return boot_values(s, key, ("low", "high"), i)


def boot_values(s: dict, key: str, parts=BOOT_PARTS, i: int | None = None) -> list:
    """The bootstrap `parts` (low, high, bias, outside) of a section's figure `key` (its
    entry i for a per-category figure); None for each without a bootstrap or for a part a
    summary written before that part existed lacks."""
    b = (s.get("bootstrap") or {}).get(key) or {}
    return [b.get(p) if i is None or b.get(p) is None else b[p][i] for p in parts]


def model_tables(model: str, section: str, s: dict) -> Iterator[Table]:
    """Tables of models.<model>.<section>."""
    p = f"{safe_name(model)}_{section}"
    yield Table(f"{p}_categories",
                ["category", "short", "n_instructions", "size", "size_low", "size_high", "unique",
                 "unique_low", "unique_high", "unique_ratio", "mean_instruction_set_size",
                 "mean_frequency", "size_bias", "size_outside", "unique_bias", "unique_outside"],
                [[c, SHORT_NAMES[c], s["n_per_category"][c], s["per_category_count"][c],
                  *interval(s, "per_category_count", i), s["unique"][c], *interval(s, "unique", i),
                  s["unique_ratio"][c], s["mean_instruction_set_size"][c], s["mean_frequency"][c],
                  *boot_values(s, "per_category_count", ("bias", "outside"), i),
                  *boot_values(s, "unique", ("bias", "outside"), i)]
                 for i, c in enumerate(CATEGORIES)])
    boot = s.get("bootstrap") or {}
    for key in ("overlap_jaccard", "overlap_coefficient", "instruction_overlap"):
        if s.get(key) is None:
            continue
        yield matrix_table(f"{p}_{key}", s[key])
        for part in BOOT_PARTS:  # the bootstrap interval, bias and outside flag of each cell
            if (boot.get(key) or {}).get(part) is not None:
                yield matrix_table(f"{p}_{key}_{part}", boot[key][part])
    n_layers = len(s["union_per_layer"])
    yield Table(f"{p}_per_layer",
                ["layer", *[f"count_{x}" for x in SHORT], "union", "general",
                 *[f"share_{x}" for x in SHORT]],
                [[j, *[s["per_layer"][c][j] for c in CATEGORIES], s["union_per_layer"][j],
                  s["general_per_layer"][j], *[s["per_layer_share"][c][j] for c in CATEGORIES]]
                 for j in range(n_layers)])
    perm = s.get("permutation") or {}
    gen = [["general", s["general"]], ["union", s["union"]], ["general_share", s["general_share"]],
           ["diagonal_dominance", s["diagonal_dominance"]],
           ["permutation_p_value", perm.get("p_value")], ["permutation_n", perm.get("n_perm")]]
    gen += [[f"{k}_{part}", v] for k in ("general", "general_share", "diagonal_dominance")
            for part, v in zip(BOOT_PARTS, boot_values(s, k))]
    gen += [["bootstrap_n", boot.get("n_boot")], ["bootstrap_ci", boot.get("ci")],
            ["bootstrap_unit", boot.get("unit")], ["permutation_unit", perm.get("unit")]]
    gen += [[f"breadth_{k}", v] for k, v in s["breadth_histogram"].items()]
    yield Table(f"{p}_generality", ["metric", "value"], gen)
    dom = dominance_rows(s)
    if dom is not None:
        yield Table(f"{p}_dominance", DOMINANCE_HEADER, dom)
    v = s.get("set_size_vs_length")
    if v:
        yield Table(f"{p}_set_size_vs_length", LENGTH_HEADER, length_rows(v))
        if v.get("tokens") is not None:
            yield Table(f"{p}_set_size_vs_length_instructions", ["instruction", "category", "tokens", "set_size"],
                        [[i, *r] for i, r in enumerate(zip(v["category"], v["tokens"], v["set_size"]))])
    c = s.get("contrast")
    if c:
        yield Table(f"{p}_contrast",
                    ["category", "size", "contrast_size", "mean_instruction_set_size",
                     "contrast_mean_instruction_set_size", "contrast_unique"],
                    [[k, s["per_category_count"][k], c["per_category_count"][k],
                      s["mean_instruction_set_size"][k], c["mean_instruction_set_size"][k], c["unique"][k]]
                     for k in CATEGORIES])
    if s.get("top_instructions"):
        yield Table(f"{p}_top_instructions", TOP_HEADER, top_instruction_rows(s["top_instructions"]))
    yield Table(f"{p}_phases",
                ["profile", "middle_starts", "late_starts", "early_mean", "middle_mean", "late_mean",
                 "explained", "early_dominant", "explained_p"],
                [[k, *(ph["boundaries"] or [None, None]),
                  *[(ph[x] or {}).get("mean") for x in ("early", "middle", "late")],
                  ph["explained"], ph["early_dominant"], ph.get("explained_p")] for k, ph in s["phases"].items()])


def dominance_rows(s: dict) -> list[list] | None:
    """Rows of DOMINANCE_HEADER (per category, then "overall"), or None without the
    instruction-level overlap."""
    if s.get("per_category_dominance") is None:
        return None
    perm = s.get("permutation") or {}
    hum = s.get("human_subset") or {}
    hperm = hum.get("permutation") or {}
    bg = s.get("between_groups") or {}
    bperm = bg.get("permutation") or {}
    lperm = s.get("length_matched") or {}

    def at(seq, i):
        return None if seq is None else seq[i]

    rows = [[c, s["per_category_dominance"][c], *interval(s, "per_category_dominance", i),
             at(perm.get("per_category_p_value"), i),
             (hum.get("per_category_dominance") or {}).get(c), at(hperm.get("per_category_p_value"), i),
             (hum.get("n_per_category") or {}).get(c),
             *boot_values(s, "per_category_dominance", ("bias", "outside"), i),
             (bg.get("per_category_dominance") or {}).get(c), at(bperm.get("per_category_p_value"), i),
             (bg.get("within_group_pairs") or {}).get(c),
             *boot_values(bg, "per_category_dominance", BOOT_PARTS, i),
             at(perm.get("per_category_p_holm"), i), at(lperm.get("per_category_p_value"), i), None]
            for i, c in enumerate(CATEGORIES)]
    rows.append(["overall", s["diagonal_dominance"], *interval(s, "diagonal_dominance"), perm.get("p_value"),
                 hum.get("diagonal_dominance"), hperm.get("p_value"), hum.get("n"),
                 *boot_values(s, "diagonal_dominance", ("bias", "outside")),
                 bg.get("diagonal_dominance"), bperm.get("p_value"),
                 sum(bg["within_group_pairs"].values()) if bg else None,
                 *boot_values(bg, "diagonal_dominance"), None, lperm.get("p_value"), lperm.get("null_mean")])
    return rows


# bias / outside: the bootstrap bias and whether the estimate lies outside [low, high].
# between_groups_*: the same without the pairs of records of one group (near-duplicate instructions)
# (within_group_pairs of them), tested by shuffling whole groups, with its interval, bias and
# outside flag from a bootstrap over groups. permutation_p_holm: the six per-category
# permutation p-values Holm-adjusted (family-wise over the categories; empty on "overall").
# length_matched_*: the test with labels shuffled among records of similar prompt length, and
# (overall) its null mean: the part of the diagonal that length alone gives.
DOMINANCE_HEADER = ["category", "dominance", "low", "high", "permutation_p", "human_dominance",
                    "human_permutation_p", "human_n", "bias", "outside", "between_groups_dominance",
                    "between_groups_permutation_p", "within_group_pairs", "between_groups_low",
                    "between_groups_high", "between_groups_bias", "between_groups_outside",
                    "permutation_p_holm", "length_matched_permutation_p", "length_matched_null_mean"]


LENGTH_HEADER = ["category", "n", "mean_tokens", "mean_set_size", "spearman", "mean_set_size_ties_kept",
                 "spearman_ties_kept"]


def length_rows(v: dict) -> list[list]:
    """Rows of LENGTH_HEADER for a set_size_vs_length entry, plus an "all" row; the last two
    columns (the same rule with ties at the cut kept) are empty unless ties were broken."""
    per, kept = v["per_category"], v.get("ties_kept")
    kper = kept["per_category"] if kept else {}
    return ([[c, per[c]["n"], per[c]["mean_tokens"], per[c]["mean_set_size"], per[c]["spearman"],
              kper.get(c, {}).get("mean_set_size"), kper.get(c, {}).get("spearman")] for c in CATEGORIES]
            + [["all", sum(per[c]["n"] for c in CATEGORIES), None, None, v["spearman"], None,
                kept["spearman"] if kept else None]])


TOP_HEADER = ["category", "unit", "category_frequency", "rank", "instruction_id", "instruction_category",
              "frequency", "tokens"]


def unit_label(u: dict) -> str:
    """"L3/E1/N7"-style label of a unit entry of top_instructions."""
    return "/".join(f"{k[0].upper()}{u[k]}" for k in ("layer", "expert", "neuron") if k in u)


def top_instruction_rows(top: dict) -> list[list]:
    """Rows of TOP_HEADER: one per (category, listed unit, ranked instruction)."""
    rows = []
    for c in CATEGORIES:
        for u in top.get(c) or []:
            for r, inst in enumerate(u["instructions"], 1):
                rows.append([c, unit_label(u), u["category_frequency"], r, inst["id"], inst["category"],
                             inst["frequency"], inst["tokens"]])
    return rows


# Comparison figures with a paired bootstrap interval in the comparison table (`<key>_low`, `_high`).
_PAIRED = ("retained", "gained", "lost", "jaccard")


def comparison_tables(section: str, comp: dict, prefix: str = "comparison") -> Iterator[Table]:
    """Tables of comparison.<section> (or of a control comparison, with its prefix); a category
    without instructions has empty cells (nothing was measured), not 0."""
    comp = measured_comparison(comp)
    effect = any(comp[c].get("template_effect") for c in CATEGORIES)  # a same-template control
    parts = ("estimate", "low", "high")
    yield Table(f"{prefix}_{section}",
                ["category", *SET_KEYS, "mean_p_before", "mean_p_after", "mean_p_delta",
                 *[f"contrast_{k}" for k in SET_KEYS], *[f"{k}_{b}" for k in _PAIRED for b in ("low", "high")],
                 *([f"template_effect_{k}{'' if b == 'estimate' else '_' + b}" for k in _PAIRED for b in parts]
                   if effect else [])],
                [[c, *[comp[c][k] for k in SET_KEYS],
                  *[comp[c]["frequency_shift"][k] for k in ("mean_before", "mean_after", "delta")],
                  *[(comp[c].get("contrast") or {}).get(k) for k in SET_KEYS],
                  *[((comp[c].get("bootstrap") or {}).get(k) or {}).get(b) for k in _PAIRED for b in ("low", "high")],
                  *([((comp[c].get("template_effect") or {}).get(k) or {}).get(b) for k in _PAIRED for b in parts]
                    if effect else [])]
                 for c in CATEGORIES])
    rows = []
    for c in CATEGORIES:
        pl, delta = comp[c]["per_layer"], comp[c]["frequency_shift"]["per_layer_delta"]
        rows += [[c, j, *[pl[k][j] for k in SET_KEYS], d] for j, d in enumerate(delta)]
    yield Table(f"{prefix}_{section}_per_layer", ["category", "layer", *SET_KEYS, "mean_p_delta"], rows)


def ablation_tables(kind: str, d: dict) -> Iterator[Table]:
    """Tables of one ablation result dict (AblationResult.to_dict())."""
    for k in ("isn", "random", "excess", "excess_std", "random_ge_fraction", "p_value"):
        if d.get(k) is None:
            continue
        yield matrix_table(f"ablation_{kind}_{k}", d[k], corner=ABLATION_CORNER)
    yield Table(f"ablation_{kind}_baseline", ABLATION_HEADER, ablation_rows(d))
    mm = d.get("mass_matched")  # the mass-matched control (experts: routing; neurons: firing), where it ran
    if mm:
        for k in ("excess", "p_value", "set_mass_matrix", "random_mass_matrix_mean"):
            if mm.get(k) is not None:  # (the masses on every category's tokens: not in older files)
                yield matrix_table(f"ablation_{kind}_mass_matched_{k}", mm[k], corner=ABLATION_CORNER)
        yield Table(f"ablation_{kind}_mass_matched", mass_header(d["kind"]), mass_rows(d))
        if mm.get("set_layer_mass") is not None:  # (absent from files of the rule that matched the estimate)
            yield Table(f"ablation_{kind}_mass_matched_per_layer", mass_layer_header(d["kind"]),
                        mass_layer_rows(mm, d["kind"]))
    mg = d.get("magnitude_matched")  # neurons: the magnitude-matched control, where it ran
    if mg:
        for k in ("excess", "p_value"):
            yield matrix_table(f"ablation_{kind}_magnitude_matched_{k}", mg[k], corner=ABLATION_CORNER)
        yield Table(f"ablation_{kind}_magnitude_matched", magnitude_matched_header(d["kind"]),
                    magnitude_matched_rows(d))


ABLATION_HEADER = ["category", "baseline_loss", "set_size", "excess_own", "excess_own_std",
                   "random_ge_fraction_own", "dropped_mass", "random_dropped_mass_mean",
                   "in_set_mean", "p_own", "set_frequency", "random_frequency_mean", "closest_frequency",
                   "above_others", "held_out_records", "scored_records", "response_tokens"]


MASS_HEADER = ["category", "set_size", "excess_own", "excess_own_std", "random_ge_fraction_own", "p_own",
               "set_mass_own_tokens", "set_mass_own_tokens_estimate", "random_mass_own_tokens_mean",
               "random_mass_own_tokens_min", "random_mass_own_tokens_max", "random_mass_error_mean",
               "random_mass_error_abs_mean", "random_experts_mean"]


def mass_header(kind: str) -> list[str]:
    """MASS_HEADER with the draws' size named for the kind ("experts", "neurons", "expert_neurons"),
    and for the neuron kinds the held-out records the firing was counted on and MAGNITUDE_HEADER."""
    return MASS_HEADER[:-1] + [f"random_{kind}_mean"] + (
        [] if kind == "experts" else ["held_out_firing_records", *MAGNITUDE_HEADER])


# Neuron kinds: the activation magnitude the set and its firing-mass-matched draws carry
# (`AblationResult.magnitude`; empty where it was not measured).
MAGNITUDE_HEADER = ["set_magnitude_own_records", "random_magnitude_mean", "magnitude_ratio"]
MAGNITUDE_KEYS = ("set", "random_mean", "ratio")


# Neuron kinds: the magnitude-matched control (`AblationResult.magnitude_matched`), after the CONTROL_HEADER
# columns: the magnitude the set and its draws carry, the draws' error, and the firing they carry with it.
MAGNITUDE_MATCHED_HEADER = ["set_magnitude_own_records", "random_magnitude_mean", "random_magnitude_error_mean",
                            "random_magnitude_error_abs_mean", "set_firing_own_records", "random_firing_mean",
                            "random_firing_ratio"]
MAGNITUDE_MATCHED_KEYS = ("set", "random_mean", "error_mean", "error_abs_mean", "set_firing", "random_firing_mean",
                          "firing_ratio")
# A control's own-category columns (its dict's [C][C] entries on the diagonal).
CONTROL_HEADER = ["excess_own", "excess_own_std", "random_ge_fraction_own", "p_own"]
CONTROL_KEYS = ("excess", "excess_std", "random_ge_fraction", "p_value")


def magnitude_matched_header(kind: str) -> list[str]:
    """The magnitude-matched control's table header for a neuron kind ("neurons", "expert_neurons")."""
    return ["category", "set_size", *CONTROL_HEADER, *MAGNITUDE_MATCHED_HEADER, f"random_{kind}_mean"]


def magnitude_matched_rows(d: dict) -> list[list]:
    """Per ablated category, the magnitude-matched control (`d["magnitude_matched"]`): the own-category
    excess, its spread, the share of draws as harmful and p; the activation magnitude the set and its
    draws (mean) carry on the category's held-out records, a draw's error against the set's (mean signed
    and absolute); the firing mass they carry there and the draws' over the set's; the draws' mean size.
    Empty cells where it did not run for the category."""
    mg = d["magnitude_matched"]
    return [[c, d["set_sizes"][c], *_control_cells(mg, i),
             *((mg.get(k) or {}).get(c) for k in MAGNITUDE_MATCHED_KEYS),
             _mean(_column(mg["random_sizes"], i)) if _own(mg["p_value"], i) is not None else None]
            for i, c in enumerate(CATEGORIES)]


def _control_cells(ctrl: dict, i: int) -> list:
    """Category i's own-category cells of a control's dict (CONTROL_KEYS)."""
    return [_own(ctrl[k], i) for k in CONTROL_KEYS]


MASS_LAYER_HEADER = ["category", "layer", "set_mass_estimate", "set_mass_measured", "shift", "random_mass_mean",
                     "random_error_mean", "random_error_abs_mean"]


def mass_layer_header(kind: str) -> list[str]:
    """MASS_LAYER_HEADER, for the neuron kinds with the set's and the draws' activation magnitude per layer."""
    return MASS_LAYER_HEADER + ([] if kind == "experts" else ["set_magnitude", "random_magnitude_mean"])


def _own(m: list | None, i: int):
    """Category i's own entry [i][i] of a [C][C] matrix; None without the matrix."""
    return None if m is None else m[i][i]


def _column(m: list | None, i: int) -> list:
    """The entries of column i of a [R][C] list that are not None; [] without the list."""
    return [r[i] for r in m or [] if r[i] is not None]


def _mean(vals: list):
    return sum(vals) / len(vals) if vals else None


def _total(vals: list | None):
    """The sum of a list of floats; None without the list or where an entry is None."""
    return None if vals is None or None in vals else sum(vals)


def mass_rows(d: dict) -> list[list]:
    """Per ablated category, the mass-matched control (`d["mass_matched"]`): the own-category
    excess, its spread, the share of draws as harmful and p; the routing mass the set dropped
    on the category's own held-out tokens and the unablated model's estimate of it (its
    layers' `set_layer_estimate` summed; None in files without it), and the mass its draws
    dropped (mean, min, max over draws) and its mean signed and absolute error against the
    set's (None in files made before they were kept); the draws' mean number of experts; for
    neurons and expert neurons, the held-out records the firing was counted on (None with the
    identification's firing and in files made before it was kept) and the activation magnitude the
    set and its draws carry there, and their ratio (`MAGNITUDE_HEADER`; None where not measured)."""
    mm, rows = d["mass_matched"], []
    for i, c in enumerate(CATEGORIES):
        mass = _column(mm["random_mass"], i)
        rows.append([c, d["set_sizes"][c], *_control_cells(mm, i),
                     mm["set_mass"].get(c), _total((mm.get("set_layer_estimate") or {}).get(c)),
                     _mean(mass), min(mass, default=None), max(mass, default=None),
                     *((mm.get(f"error_{k}") or {}).get(c) for k in ("mean", "abs_mean")),
                     _mean(_column(mm["random_sizes"], i)),
                     *([] if d["kind"] == "experts" else [(mm.get("firing_records") or {}).get(c),
                                                          *(_magnitude(mm, k, c) for k in MAGNITUDE_KEYS)])])
    return rows


def _magnitude(mm: dict, key: str, c: str):
    """Category c's `key` of the mass-matched control's activation magnitude; None where not measured."""
    return ((mm.get("magnitude") or {}).get(key) or {}).get(c)


def mass_layer_rows(mm: dict, kind: str = "experts") -> list[list]:
    """Per ablated category and layer, from the mass-matched control's dict `mm`: the routing
    mass the set's experts carry on the category's own held-out tokens as the unablated model
    estimates it (`set_layer_estimate`), the mass they dropped in the set's own pass
    (`set_layer_mass`, what the draws match) and the shift, measured minus estimate (None
    where either is None); the mass the mass-matched draws dropped there (measured in their
    passes, mean over draws) and their mean signed and absolute error against the set's (None
    in files made before they were kept); for the neuron kinds (`kind`) the activation magnitude
    the set and its draws (mean) carry in the layer (None where it was not measured)."""
    est, meas = mm.get("set_layer_estimate") or {}, mm["set_layer_mass"]
    err, abs_err = mm.get("error_layer_mean") or {}, mm.get("error_layer_abs_mean") or {}
    mag = mm.get("magnitude") or {}
    draw_mag = mag.get("random_layer") or []
    rows = []
    for i, c in enumerate(CATEGORIES):
        for j, m in enumerate(meas.get(c) or []):
            e, de, ae, sm = ((v.get(c) or [None] * (j + 1))[j] for v in (est, err, abs_err, mag.get("set_layer") or {}))
            rows.append([c, j, e, m, None if e is None or m is None else m - e,
                         None if de is None or m is None else m + de, de, ae,
                         *([] if kind == "experts" else [sm, _mean([r[i][j] for r in draw_mag if r[i][j] is not None])])])
    return rows


def ablation_rows(d: dict) -> list[list]:
    """Per ablated category: baseline, size, the own-category excess and its spread,
    dropped routing mass, how well the random controls matched (units from the set; the mean
    frequency of the set, of the draws and of the closest match the data allow; the set's
    units that no unit outside it matches), the Monte-Carlo p, and
    the held-out records (all, those scored) and response tokens the category's loss rests on."""
    def own(key, i):
        return _own(d.get(key), i)

    def col_mean(key, i):
        return _mean(_column(d.get(key), i))

    def of(key, c):  # a {category: value} entry, None where the file has none
        return (d.get(key) or {}).get(c)

    return [[c, d["baseline"].get(c), d["set_sizes"][c], own("excess", i), own("excess_std", i),
             own("random_ge_fraction", i), of("dropped_mass", c),
             col_mean("random_dropped_mass", i), col_mean("in_set", i), own("p_value", i),
             of("set_frequency", c), col_mean("random_frequency", i),
             of("closest_frequency", c), of("above_others", c),
             *((of("coverage", c) or {}).get(k) for k in ("records", "scored_records", "response_tokens"))]
            for i, c in enumerate(CATEGORIES)]


# series.<section>.bootstrap.per_checkpoint figures with `<column>_low` / `_high` columns in the series tables.
_SERIES_CATEGORY = (("size", "per_category_count"), ("unique_ratio", "unique_ratio"),
                    ("jaccard_vs_first", "vs_base_jaccard"), ("jaccard_vs_previous", "vs_previous_jaccard"))
_SERIES_MODEL = ("general_share", "diagonal_dominance")


def unmeasured(t: dict) -> list[str]:
    """The categories a series.<section> `t` has no instructions of (none in a series written
    before it carried n_instructions)."""
    return absent_categories(t.get("n_instructions") or {})


def measured_only(t: dict) -> dict:
    """series.<section> `t` with every per-category figure of a category without instructions
    (`unmeasured`) made None, its intervals and first-to-last change included: the series holds
    0 there (an empty set, no change), which tables and figures would show as a measured 0."""
    absent = set(unmeasured(t))
    return {**_blank(t, absent), "n_instructions": t.get("n_instructions")} if absent else t


def unmeasured_compared(entry: dict) -> list[str]:
    """The categories a comparison section {category: figures} has no instructions of."""
    return absent_categories({c: (entry.get(c) or {}).get("n_instructions") for c in CATEGORIES})


def measured_comparison(entry: dict) -> dict:
    """A comparison section {category: figures} with every figure of a category without
    instructions (`unmeasured_compared`) made None, as `measured_only` does for a series."""
    absent = unmeasured_compared(entry)
    return {c: {**_none_like(v), "n_instructions": 0} if c in absent else v for c, v in entry.items()}


def _blank(v: Any, absent: set[str]) -> Any:
    if not isinstance(v, dict):
        return v
    per_category = set(v) == set(CATEGORIES)
    return {k: _none_like(x) if per_category and k in absent else _blank(x, absent) for k, x in v.items()}


def _none_like(v: Any) -> Any:
    """`v` with no value in it: a dict's entries and a list's items None, keeping the keys and length."""
    if isinstance(v, dict):
        return {k: _none_like(x) for k, x in v.items()}
    return [None] * len(v) if isinstance(v, list) else None


def series_tables(section: str, names: list[str], t: dict) -> Iterator[Table]:
    """Tables of series.<section>: the trends with their paired intervals (empty cells without a
    bootstrap, and for a category without instructions: nothing was measured), and the change
    of each trend from the first to the last checkpoint."""
    n_instructions = t.get("n_instructions") or {}
    t = measured_only(t)
    boot = t.get("bootstrap") or {}
    per = boot.get("per_checkpoint") or {}

    def bounds(fig, i, c=None):
        e = per.get(fig) or {}
        return [None if e.get(b) is None else (e[b] if c is None else e[b][c])[i] for b in ("low", "high")]

    rows = []
    for i, n in enumerate(names):
        for c in CATEGORIES:
            rows.append([n, c, n_instructions.get(c), t["per_category_count"][c][i], t["unique"][c][i],
                         t["unique_ratio"][c][i],
                         t["vs_base"]["jaccard"][c][i], t["vs_previous"]["jaccard"][c][i],
                         t["vs_previous"]["retained"][c][i], t["vs_previous"]["gained"][c][i],
                         t["vs_previous"]["lost"][c][i], *[x for _, f in _SERIES_CATEGORY for x in bounds(f, i, c)]])
    yield Table(f"series_{section}",
                ["checkpoint", "category", "n_instructions", "size", "unique", "unique_ratio", "jaccard_vs_first",
                 "jaccard_vs_previous", "retained_vs_previous", "gained_vs_previous", "lost_vs_previous",
                 *[f"{col}_{b}" for col, _ in _SERIES_CATEGORY for b in ("low", "high")]],
                rows)
    yield Table(f"series_{section}_model", ["checkpoint", "general", "union", "general_share",
                                            "diagonal_dominance",
                                            *[f"{f}_{b}" for f in _SERIES_MODEL for b in ("low", "high")]],
                [[n, t["general"][i], t["union"][i], t["general_share"][i], t["diagonal_dominance"][i],
                  *[x for f in _SERIES_MODEL for x in bounds(f, i)]]
                 for i, n in enumerate(names)])
    if boot:
        rows = []
        for fig, e in boot["change"].items():
            for c in (CATEGORIES if isinstance(e["estimate"], dict) else [None]):
                rows.append([fig, c, *[e[k] if c is None else e[k][c] for k in ("estimate", "low", "high", "bias",
                                                                                  "outside")]])
        yield Table(f"series_{section}_change", ["figure", "category", "change", "low", "high", "bias", "outside"],
                    rows)


def all_tables(summary: dict) -> Iterator[Table]:
    """Every table of a summary."""
    for m, ms in summary["models"].items():
        for sec, s in ms.items():
            if sec != "meta":
                yield from model_tables(m, sec, s)
    comp = summary.get("comparison") or {}
    for sec in SECTIONS.values():
        if sec in comp:
            yield from comparison_tables(sec, comp[sec])
    for name, ctrl in (summary.get("controls") or {}).items():
        for sec in SECTIONS.values():
            if sec in ctrl:
                yield from comparison_tables(sec, ctrl[sec], prefix=f"control_{safe_name(name)}")
    for kind in ("neurons", "experts", "expert_neurons"):
        d = (summary.get("ablation") or {}).get(kind)
        if d:
            yield from ablation_tables(kind, d)
    prec = precision_table(summary.get("precision"))
    if prec is not None:
        yield prec
    series = summary.get("series") or {}
    for sec, t in series.items():
        if sec != "names":
            yield from series_tables(sec, series["names"], t)


def precision_table(precision: dict | None) -> Table | None:
    """Category x label table of the bf16-vs-float32 set Jaccards (mapping entries only)."""
    cols = {k: v for k, v in (precision or {}).items() if isinstance(v, dict)}
    if not cols:
        return None
    return Table("precision", ["category", *cols], [[c, *[v.get(c) for v in cols.values()]] for c in CATEGORIES])
