#!/usr/bin/env python
"""How much do the demo's results move with the seed? Run the demo's model pairs for K seeds and
tabulate, per category, how many seeds pass the causal check and how far the excess moves, and
per statistic of identification, evaluation and comparison its value per seed.

    PYTHONPATH=$PWD python scripts/seed_sweep.py --seeds 5 --work runs/seed_sweep        # the MoE pair
    PYTHONPATH=$PWD python scripts/seed_sweep.py --seeds 5 --pairs mixtral,llama --fast  # a smoke run
    PYTHONPATH=$PWD python scripts/seed_sweep.py --from-json runs/seed_sweep/seed_sweep.json  # table only
    PYTHONPATH=$PWD python scripts/seed_sweep.py --from-json A/seed_sweep.json B/seed_sweep.json  # merged
    PYTHONPATH=$PWD python scripts/seed_sweep.py --from-json S.json --runs WORK  # + statistics of WORK/seed<s>

A seed here is a new training run: `seed` (the model's initialisation, and with it the
analysis' bootstrap, permutation and random-draw streams), `pretrain.seed` and
`finetune.seed` (the order of the training batches) all set to s. The data split
(`data.split_seed`) and the sampled records (`data.seed`: the identify and ablate records)
stay fixed, so every seed trains on the same train part and is identified and ablated on the
same held-out records: only the training run (and the draws) change. Everything else is the
demo's own config (`sparcom_jax.pipeline.demo.demo_config`, with --fast its fast mode); each
seed is a `run_demo` into WORK/seed<s>, which reuses its finished stages when run again with
the same settings (and refuses other settings unless --overwrite).

Per seed, pair and category it keeps, from the pair's summary.json `ablation` block: the set
size (`set_sizes`), the own-category excess (the diagonal of `excess`) and its `p_value`, and
the same against the mass-matched draws (`mass_matched.excess`, `.p_value`: routing mass for
experts, firing mass for neurons and expert neurons, where they ran). The
rows go to --json as each seed finishes; the table (per category: seeds with p <= --alpha out
of the seeds with a set, median and range of the excess, for each control) replaces the
section <!-- seed_sweep:PAIRS:start --> ... <!-- seed_sweep:PAIRS:end --> of --docs (PAIRS: the
pairs swept, joined by "+"), or is appended to the page when it has no such section.

Per seed, pair and analysed section (`isn`; `ise`, `expert_neurons`) it also keeps the statistics
the claims table of docs/analysis.md rests on (STATS: the tuned model's diagonal dominance with
its interval and p, the length-matched, human-subset and between-groups diagonals, per-category
dominance with its Holm-adjusted p under all three shuffles, the base-to-tuned change, set size
against length, before/after Jaccard, the template effect, the absolute rule's counts, the phase
fit, the precision check's Jaccard with the float32 sets), with the claim each would keep.
Their table (per statistic and category: the value per seed, median [min, max], the seeds
keeping the claim; under it, per Holm-adjusted per-category test, the category-seed tests that
pass and what chance alone would give) goes to the section seed_sweep_stats:PAIRS. --runs WORK adds them to a saved
sweep (--from-json) by reading WORK/seed<s>/report/summary.json, nothing recomputed or written
there; a run whose causal-check results differ from the sweep's is refused as not its run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import replace_section, stamp, update_results  # noqa: E402

SECTION = "seed_sweep"
STATS_SECTION = "seed_sweep_stats"  # the docs section of the identification/evaluation/comparison statistics
# The settings a seed sets: the model's initialisation (and the analysis' draws), the data order.
SEED_KEYS = ("seed", "pretrain.seed", "finetune.seed")
# (summary ablation kind, its label, whether it has the mass-matched control) per pair: the
# experts' routing mass, the neurons' firing mass (`ablation.neuron_mass_matched`; with
# "where_warned" only the categories whose frequency-matched draws fire less than the set have it,
# the others count as seeds without a value).
PAIR_KINDS = {
    "mixtral": (("experts", "experts", True), ("expert_neurons", "expert neurons", True)),
    "llama": (("neurons", "neurons", True),),
}
CONTROLS = (("excess", "p", "random"), ("mass_excess", "mass_p", "mass-matched"))


def seed_overrides(seed: int) -> list[str]:
    """The demo config overrides that make seed `seed`'s training run."""
    return [f"{k}={seed}" for k in SEED_KEYS]


def sweep_config(seed: int, pairs: list[str], fast: bool, extra=()):
    """The demo's config (fast or full) with seed `seed`, `extra` overrides and only `pairs`."""
    from sparcom_jax.pipeline.demo import demo_config

    cfg = demo_config(fast, [*seed_overrides(seed), *extra])
    known = [p.name for p in cfg.pairs]
    unknown = [p for p in pairs if p not in known]
    if unknown:
        raise SystemExit(f"--pairs: {', '.join(unknown)} is not a demo pair; the demo has {', '.join(known)}")
    return dataclasses.replace(cfg, pairs=[p for p in cfg.pairs if p.name in pairs])


def _cell(matrix, i: int):
    v = None if matrix is None else matrix[i][i]
    return None if v is None else float(v)


def seed_rows(seed: int, pair: str, summary: dict) -> list[dict]:
    """One row per (kind, category) from one pair's summary.json: set size, own-category excess
    and p against the random draws and, for experts, against the mass-matched draws."""
    ablation = summary.get("ablation") or {}
    rows = []
    for kind, _, _ in PAIR_KINDS[pair]:
        a = ablation.get(kind)
        if not isinstance(a, dict):
            raise SystemExit(f"seed {seed}, pair {pair}: summary.json has no ablation.{kind} block "
                             f"(keys: {sorted(ablation)}); run the demo with ablation.kinds including {kind}")
        mm = a.get("mass_matched") or {}
        for i, cat in enumerate(a["categories"]):
            rows.append({"seed": seed, "pair": pair, "kind": kind, "category": cat,
                         "set_size": int(a["set_sizes"][cat]),
                         "excess": _cell(a["excess"], i), "p": _cell(a["p_value"], i),
                         "mass_excess": _cell(mm.get("excess"), i), "mass_p": _cell(mm.get("p_value"), i)})
    return rows


def aggregate(values: list[float | None], ps: list[float | None], alpha: float) -> dict:
    """Seeds with a value, seeds with p <= alpha, and the median, min and max of the values."""
    have = [(v, p) for v, p in zip(values, ps) if v is not None]
    if not have:
        return {"n": 0, "passed": 0, "median": None, "low": None, "high": None}
    x = np.array([v for v, _ in have])
    return {"n": len(have), "passed": sum(p is not None and p <= alpha + 1e-12 for _, p in have),
            "median": float(np.median(x)), "low": float(x.min()), "high": float(x.max())}


def summarise(rows: list[dict], alpha: float) -> dict:
    """{(pair, kind, category): {"seeds", "size": aggregate, control: aggregate}} in row order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["pair"], r["kind"], r["category"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        sizes = [r["set_size"] for r in rs]
        out[key] = {"seeds": len(rs), "size": aggregate(sizes, [None] * len(rs), alpha),
                    **{c: aggregate([r[v] if r["set_size"] else None for r in rs], [r[p] for r in rs], alpha)
                       for v, p, c in CONTROLS}}
    return out


def _fmt_excess(a: dict, empty: str = "no set") -> str:
    if not a["n"]:
        return empty
    return f"{a['median']:+.3f} [{a['low']:+.3f}, {a['high']:+.3f}]"


def _fmt_pass(a: dict) -> str:
    return f"{a['passed']} of {a['n']}" if a["n"] else "-"


def _fmt_size(a: dict) -> str:
    lo, hi = int(a["low"]), int(a["high"])
    return f"{a['median']:g}" + ("" if lo == hi else f" ({lo}-{hi})")


def table(rows: list[dict], alpha: float) -> list[str]:
    """Markdown tables, one per pair: per category and kind, the set size and, per control,
    the seeds passing p <= alpha and the median [min, max] of the own-category excess."""
    summ = summarise(rows, alpha)
    lines = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        kinds = [(k, label, mass) for k, label, mass in PAIR_KINDS[pair] if any(key[:2] == (pair, k) for key in summ)]
        head, rule = ["category"], ["---"]
        for _, label, mass in kinds:
            head += [f"{label}: set size", f"{label}: p ≤ {alpha:g} vs random", f"{label}: excess vs random"]
            if mass:
                head += [f"{label}: p ≤ {alpha:g} vs mass-matched", f"{label}: excess vs mass-matched"]
        rule += ["---:"] * (len(head) - 1)
        lines += [f"**{pair}**", "", "| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
        for cat in dict.fromkeys(key[2] for key in summ if key[0] == pair):
            cells = [cat]
            for kind, _, mass in kinds:
                s = summ[(pair, kind, cat)]
                cells += [_fmt_size(s["size"]), _fmt_pass(s["random"]), _fmt_excess(s["random"])]
                if mass:  # (a set without the control: neurons' "where_warned" drew none for it)
                    cells += [_fmt_pass(s["mass-matched"]),
                              _fmt_excess(s["mass-matched"], "not drawn" if s["size"]["high"] else "no set")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def per_seed_table(rows: list[dict], pair: str) -> list[str]:
    """Per category and seed, the excess (p) of `pair`'s main unit (its first kind: the MoE's
    experts, the Llama's neurons) against each of its controls: which seed gave what."""
    kind, label, mass = PAIR_KINDS[pair][0]
    unit = [r for r in rows if r["pair"] == pair and r["kind"] == kind]
    if not unit:
        return []
    seeds = list(dict.fromkeys(r["seed"] for r in unit))
    by = {(r["category"], r["seed"]): r for r in unit}

    def cell(r):
        if r is None or not r["set_size"] or r["excess"] is None:
            return "no set"
        against_mass = "" if r["mass_excess"] is None else f"; {r['mass_excess']:+.2f} ({r['mass_p']:.2f})"
        return f"{r['set_size']}: {r['excess']:+.2f} ({r['p']:.2f}){against_mass}"

    drawn = mass and any(r["mass_excess"] is not None for r in unit)  # (not in sweeps made before it)
    controls = "excess vs random (p)" + ("; excess vs mass-matched (p)" if drawn else "")
    several = len({r["pair"] for r in rows}) > 1
    lines = [f"{label.capitalize()}{f' ({pair})' if several else ''} per seed: set size: {controls}.", "",
             "| category | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for cat in dict.fromkeys(r["category"] for r in unit):
        lines.append(f"| {cat} | " + " | ".join(cell(by.get((cat, s))) for s in seeds) + " |")
    return [*lines, ""]


# The identification, evaluation and comparison statistics the claims table of docs/analysis.md
# ("What the demo's tiny models do and do not show") rests on, per analysed section of a pair.
PAIR_SECTIONS = {"mixtral": ("ise", "expert_neurons"), "llama": ("isn",)}
ALL = "all"  # the category of a statistic of the whole section


class MissingField(KeyError):
    """A summary.json field a statistic needs is absent (its path in the message)."""


def _at(d, *path):
    """d[path[0]][path[1]]...; MissingField naming the path when a step is absent or null."""
    for i, k in enumerate(path):
        try:
            d = d[k]
        except (KeyError, IndexError, TypeError):
            d = None
        if d is None:
            raise MissingField(".".join(map(str, path[: i + 1])))
    return d


def _one(value, low=None, high=None, p=None, category=ALL):
    return [(category, value, low, high, p)]


def _per_cat(cats, values, low=None, high=None, p=None):
    pick = lambda x, i, c: None if x is None else (x[c] if isinstance(x, dict) else x[i])  # noqa: E731
    return [(c, pick(values, i, c), pick(low, i, c), pick(high, i, c), pick(p, i, c)) for i, c in enumerate(cats)]


def _diagonal(s, sec, cats):
    m = _at(s, "models", s["comparison"]["after"], sec)
    b = _at(m, "bootstrap", "diagonal_dominance")
    return _one(m["diagonal_dominance"], b["low"], b["high"], _at(m, "permutation", "p_value"))


def _length_matched(s, sec, cats):
    lm = _at(s, "models", s["comparison"]["after"], sec, "length_matched")
    return _one(lm["null_mean"] / lm["statistic"] if lm["statistic"] else None, p=lm["p_value"])


def _per_category(*block):
    """Per-category dominance of the tuned model's section (or of its sub-block `block`, e.g. the
    between-groups diagonal) with its bootstrap interval and the Holm-adjusted permutation p."""
    def get(s, sec, cats):
        m = _at(s, "models", s["comparison"]["after"], sec, *block)
        b = _at(m, "bootstrap", "per_category_dominance")
        return _per_cat(cats, m["per_category_dominance"], b["low"], b["high"], _at(m, "permutation", "per_category_p_holm"))
    return get


def _length_matched_per_category(s, sec, cats):
    lm = _at(s, "models", s["comparison"]["after"], sec, "length_matched")
    return _per_cat(cats, lm["per_category_statistic"], p=_at(lm, "per_category_p_holm"))


def _change(s, sec, cats):
    c = _at(s, "series", sec, "bootstrap", "change", "diagonal_dominance")
    return _one(c["estimate"], c["low"], c["high"])


def _same_template_change(s, sec, cats):
    return _one(_at(s, "controls", "same_template", "moves", sec, "diagonal_dominance", "delta"))


def _subset(key):
    def get(s, sec, cats):
        m = _at(s, "models", s["comparison"]["after"], sec, key)
        b = (m.get("bootstrap") or {}).get("diagonal_dominance") or {}
        return _one(m["diagonal_dominance"], b.get("low"), b.get("high"), _at(m, "permutation", "p_value"))
    return get


def _spearman(s, sec, cats):
    return _one(_at(s, "models", s["comparison"]["after"], sec, "set_size_vs_length", "ties_kept", "spearman"))


def _jaccard(block):
    def get(s, sec, cats):
        comp = _at(s, *block, sec)
        boot = [((comp[c].get("bootstrap") or {}).get("jaccard") or {}) for c in cats]
        return [(c, comp[c]["jaccard"], b.get("low"), b.get("high"), None) for c, b in zip(cats, boot)]
    return get


def _template_effect(s, sec, cats):
    ctrl = _at(s, "controls", "same_template", sec)
    eff = [_at(ctrl, c, "template_effect", "jaccard") for c in cats]
    return [(c, e["estimate"], e["low"], e["high"], None) for c, e in zip(cats, eff)]


def _contrast_growth(s, sec, cats):
    comp = _at(s, "comparison", sec)
    out = []
    for c in cats:
        k = _at(comp, c, "contrast")
        out.append((c, k["size_after"] / k["size_before"] - 1 if k["size_before"] else None, None, None, None))
    return out


def _frequency_shift(s, sec, cats):
    if sec == "ise":  # every token routes to top-k experts: the mean routing frequency cannot move
        return []
    return [(c, _at(s, "comparison", sec, c, "frequency_shift", "delta"), None, None, None) for c in cats]


def _precision(variant):
    """The Jaccard of each category set of the tuned model counted in `variant` with its float32
    set (summary `precision`, keyed "<section> <variant>": `pipeline.stages.precision_agreement`)."""
    def get(s, sec, cats):
        jac = _at(s, "precision", f"{sec} {variant}")
        return [(c, jac.get(c), None, None, None) for c in cats]
    return get


def _phases(s, sec, cats):
    ph = _at(s, "models", s["comparison"]["after"], sec, "phases", "union")
    return _one(ph.get("explained"), p=ph.get("explained_p"))


# (key, what it is, the claim a seed keeps, getter(pair summary, section, categories) -> [(category,
# value, low, high, p)]). Claims: "p" p <= alpha; "ci>0" / "ci<0" the interval above / below 0;
# ">0" / "<0" the value's sign; "jaccard" the value >= PRECISION_JACCARD; None: descriptive, no claim counted.
STATS = (
    ("diagonal_dominance", "diagonal dominance of the tuned model [95 % CI], permutation p", "p", _diagonal),
    ("length_matched", "length-matched null mean as a share of the diagonal, length-matched p", "p", _length_matched),
    ("length_matched_per_category", "per-category dominance, Holm-adjusted p of the length-matched shuffles", "p",
     _length_matched_per_category),
    ("per_category_dominance", "per-category dominance [95 % CI], Holm-adjusted p", "p", _per_category()),
    ("diagonal_change", "diagonal dominance, tuned minus base [95 % CI] (a fall keeps the claim)", "ci<0", _change),
    ("same_template_change", "diagonal dominance, tuned under the base's template minus base (no interval)", "<0",
     _same_template_change),
    ("human_subset", "diagonal dominance on the human-written records, p", "p", _subset("human_subset")),
    ("between_groups", "diagonal dominance without near-duplicate pairs [95 % CI], p", "p", _subset("between_groups")),
    ("between_groups_per_category", "per-category dominance without near-duplicate pairs [95 % CI], Holm-adjusted p "
     "(whole groups shuffled)", "p", _per_category("between_groups")),
    ("length_spearman", "Spearman of \\|S(I)\\| with prompt length, ties kept", "<0", _spearman),
    ("jaccard", "before/after Jaccard of S(c) [95 % CI]", None, _jaccard(("comparison",))),
    ("same_template_jaccard", "before/after Jaccard under one template [95 % CI]", None,
     _jaccard(("controls", "same_template"))),
    ("template_effect", "template effect on the Jaccard, main minus same-template [95 % CI]", "ci<0", _template_effect),
    ("contrast_growth", "relative change of \\|S(c)\\| under the absolute rule, base to tuned (growth keeps the claim)",
     ">0", _contrast_growth),
    ("frequency_shift", "change of the mean frequency, base to tuned", ">0", _frequency_shift),
    ("phases", "three-phase fit of the union profile: explained share, explained_p", "p", _phases),
    ("precision_bfloat16", "Jaccard of the tuned model's S(c) counted in bfloat16 with its float32 S(c)", "jaccard",
     _precision("bfloat16")),
    ("precision_f32_gate", "the same, bfloat16 with the gate (its input and weights) in float32", "jaccard",
     _precision("bfloat16 with float32 gate and weights")),
)
# A set that keeps the precision claim: its Jaccard with the float32 set at least this (our choice of
# "close to 1": at equal sizes, at most about 2.5 % of the set's units swapped).
PRECISION_JACCARD = 0.95
# The statistics whose p-values are Holm-adjusted over a seed's categories: the per-category tests
# counted together under the table, with what chance alone would give.
HOLM = ("length_matched_per_category", "per_category_dominance", "between_groups_per_category")


# The statistics with one row per category (the others have one row, category ALL).
PER_CATEGORY = {*HOLM, "jaccard", "same_template_jaccard", "template_effect", "contrast_growth", "frequency_shift",
                "precision_bfloat16", "precision_f32_gate"}


def stat_rows(seed: int, pair: str, summary: dict) -> list[dict]:
    """One row per (section, statistic, category) of STATS from one pair's summary.json. A
    statistic the run did not compute (a control off, a null field) gets rows without a value
    that name the missing field (`missing`); a summary without the pair's sections is refused."""
    cats = list(summary.get("categories") or [])
    rows = []
    for sec in PAIR_SECTIONS[pair]:
        try:
            _at(summary, "models", _at(summary, "comparison", "after"), sec)
        except MissingField as e:
            raise SystemExit(f"seed {seed}, pair {pair}: summary.json has no {e.args[0]} (the tuned model's "
                             f"section {sec}); give the summary of a demo run of pair {pair}") from None
        for key, _, _, get in STATS:
            try:
                got, missing = get(summary, sec, cats), None
            except (KeyError, TypeError, IndexError) as e:  # MissingField: a step absent or null; else a field of it
                where = e.args[0] if isinstance(e, MissingField) else f"{key} field {e}"
                got, missing = [(c, None, None, None, None) for c in (cats if key in PER_CATEGORY else [ALL])], where
            rows += [{"seed": seed, "pair": pair, "section": sec, "stat": key, "category": c, "value": v,
                      "low": lo, "high": hi, "p": p, **({"missing": missing} if missing else {})}
                     for c, v, lo, hi, p in got]
    return rows


def keeps(claim: str | None, r: dict, alpha: float) -> bool | None:
    """Whether row `r` keeps `claim` (None: no claim, or nothing to judge it by)."""
    v, lo, hi, p = r["value"], r["low"], r["high"], r["p"]
    test = {"p": p, "ci>0": lo, "ci<0": hi, ">0": v, "<0": v, "jaccard": v}.get(claim)
    if test is None:
        return None
    return {"p": lambda: p <= alpha + 1e-12, "ci>0": lambda: lo > 0, "ci<0": lambda: hi < 0,
            ">0": lambda: v > 0, "<0": lambda: v < 0, "jaccard": lambda: v >= PRECISION_JACCARD - 1e-12}[claim]()


def _claim_text(claim: str | None, alpha: float) -> str:
    return {"p": f"p ≤ {alpha:g}", "ci>0": "CI above 0", "ci<0": "CI below 0", ">0": "above 0",
            "<0": "below 0", "jaccard": f"≥ {PRECISION_JACCARD:g}", None: "-"}[claim]


def _fmt_stat(r: dict | None) -> str:
    if r is None or r["value"] is None:
        return "-"
    out = f"{r['value']:+.3f}"
    if r["low"] is not None:
        out += f" [{r['low']:+.3f}, {r['high']:+.3f}]"
    return out + ("" if r["p"] is None else f", p {r['p']:.3g}")


def stats_table(stats: list[dict], alpha: float) -> list[str]:
    """Per pair and section, one line per (statistic, category): the value per seed, the median
    [min, max] over seeds, and the seeds that keep the statistic's claim out of those with a value."""
    claims = {key: claim for key, _, claim, _ in STATS}
    lines = []
    for pair, sec in dict.fromkeys((r["pair"], r["section"]) for r in stats):
        mine = [r for r in stats if (r["pair"], r["section"]) == (pair, sec)]
        seeds = list(dict.fromkeys(r["seed"] for r in mine))
        by = {(r["stat"], r["category"], r["seed"]): r for r in mine}
        lines += [f"**{pair}, `{sec}`**", "", "| statistic | category | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | median [min, max] | seeds keeping the claim |", "|---|---|" + "---|" * (len(seeds) + 2)]
        for key, cat in dict.fromkeys((r["stat"], r["category"]) for r in mine):
            claim = claims[key]
            rs = [by.get((key, cat, s)) for s in seeds]
            have = [r for r in rs if r is not None and r["value"] is not None]
            agg = aggregate([r["value"] for r in have], [None] * len(have), alpha)
            spread = "-" if not agg["n"] else f"{agg['median']:+.3f} [{agg['low']:+.3f}, {agg['high']:+.3f}]"
            kept = [keeps(claim, r, alpha) for r in have]
            count = "-" if claim is None else f"{sum(k is True for k in kept)} of {sum(k is not None for k in kept)} ({_claim_text(claim, alpha)})"
            lines.append(f"| `{key}` | {cat} | " + " | ".join(_fmt_stat(r) for r in rs) + f" | {spread} | {count} |")
        lines += ["", *holm_lines(mine, alpha)]
    return lines


def holm_lines(stats: list[dict], alpha: float) -> list[str]:
    """For one pair and section, per statistic of HOLM: the category-seed tests that pass and the
    seeds with a pass, each beside what chance alone would give (upper bounds that hold however
    the tests depend on each other)."""
    parts, cats = [], 0
    for key in HOLM:
        tested = [r for r in stats if r["stat"] == key and r["value"] is not None and r["p"] is not None]
        if not tested:
            continue
        seeds = list(dict.fromkeys(r["seed"] for r in tested))
        passed = [r for r in tested if keeps("p", r, alpha)]
        cats = max(cats, *(sum(r["seed"] == s for r in tested) for s in seeds))
        parts.append(f"`{key}` {len(passed)} of {len(tested)} tests [≤ {alpha * len(tested):.2g}], in "
                     f"{len({r['seed'] for r in passed})} of {len(seeds)} seeds [≤ {alpha * len(seeds):.2g}]")
    if not parts:
        return []
    return [f"Per-category tests passing (p ≤ {alpha:g}, Holm-adjusted over a seed's {cats} categories), and in "
            f"brackets what chance alone would give if no category's diagonal were real: at most {alpha:g} x "
            f"the tests would pass on average and, Holm keeping the chance of any pass within a seed at most "
            f"{alpha:g}, at most {alpha:g} x the seeds would show one: " + "; ".join(parts) + ".", ""]


def stats_section(result: dict) -> str:
    """The docs section of the identification, evaluation and comparison statistics across seeds."""
    stats, alpha, seeds = result["stats"], result["alpha"], result["seeds"]
    cap = (f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}) of the demo's "
           f"{'fast' if result['fast'] else 'full'} mode, pairs {', '.join(result['pairs'])}, the tuned model (the "
           f"comparison's `after`) against its base; read from each seed's report/summary.json "
           f"({result.get('stats_from') or 'as the seed finished'}); code {result['code']}.")
    body = [f"_{cap}_", "", "Per statistic and category: the value per seed (95 % bootstrap interval and p where "
            "the summary has them), the median [min, max] over the seeds, and the seeds whose value keeps the "
            "claim (the test in brackets) out of the seeds with a value. The statistics:", "",
            *[f"- `{key}`: {what}" for key, what, _, _ in STATS], "", *_missing_lines(stats), *stats_table(stats, alpha)]
    return "\n".join(body)


def _missing_lines(stats: list[dict]) -> list[str]:
    """What some seed's summary did not hold (its cells show -), per statistic and section."""
    gaps: dict[tuple, dict] = {}
    for r in stats:
        if r.get("missing"):
            gaps.setdefault((r["pair"], r["section"], r["stat"], r["missing"]), {})[r["seed"]] = None
    if not gaps:
        return []
    return ["Not computed in some runs (shown -): " + "; ".join(
        f"{pair} `{sec}` `{key}` in seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))} (no `{path}`)"
        for (pair, sec, key, path), s in gaps.items()) + ".", ""]


def code_version() -> str:
    """The commit, marked when the package or configs differ from it (the code the numbers ran)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "sparcom_jax", "configs")
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return sha + (" with uncommitted changes to sparcom_jax/ or configs/" if dirty else "")


def section(result: dict) -> str:
    """The docs section: caption (what ran, where, which code), the tables, how to read them."""
    rows, alpha, seeds = result["rows"], result["alpha"], result["seeds"]
    n_random = sorted({r for r in result.get("n_random", [])})
    cap = (f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}) of the demo's {'fast' if result['fast'] else 'full'} "
           f"mode, pairs {', '.join(result['pairs'])}; each seed sets {', '.join(f'`{k}`' for k in SEED_KEYS)} "
           f"(`data.split_seed` and `data.seed` fixed: the same train, identify and ablate records); "
           f"{'/'.join(map(str, n_random)) or '?'} random draws per control, so the smallest p is "
           f"{'/'.join(f'{1 / (n + 1):.2g}' for n in n_random) or '?'}; code {result['code']}; {result['stamp']}; "
           f"{result['versions']}; {result['seconds_per_seed']:.0f} s per seed on average.")
    body = [f"_{cap}_", "", f"Per category: the set size (median, range over seeds), the seeds whose own-category "
            f"excess has p ≤ {alpha:g} out of the seeds with a set, and the median [min, max] of that excess "
            "(nats per token) over those seeds.", "", *table(rows, alpha)]
    for pair in dict.fromkeys(r["pair"] for r in rows):
        body += per_seed_table(rows, pair)
    return "\n".join(body)


def _versions() -> str:
    import importlib.metadata as md

    out = []
    for name in ("jaxlib", "optax", "numpy"):
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            out.append(f"{name} absent")
    return ", ".join(out)


def run_seed(seed: int, args) -> tuple[list[dict], list[dict], int, float]:
    """One demo run with seed `seed`: its causal-check rows, its statistics' rows, its number of
    random draws, its seconds."""
    from sparcom_jax.pipeline.demo import run_demo

    cfg = sweep_config(seed, args.pairs, args.fast, args.override)
    t = time.perf_counter()
    res = run_demo(Path(args.work) / f"seed{seed}", cfg=cfg, overwrite=args.overwrite)
    took = time.perf_counter() - t
    pairs = json.loads(Path(res["summary"]).read_text())["pairs"]
    rows = [r for p in args.pairs for r in seed_rows(seed, p, pairs[p])]
    stats = [r for p in args.pairs for r in stat_rows(seed, p, pairs[p])]
    return rows, stats, cfg.ablation.n_random, took


def section_key(pairs) -> str:
    """The docs section of a sweep of `pairs`: one per set of pairs, so sweeps of each pair keep theirs."""
    return f"{SECTION}:{'+'.join(pairs)}"


def load_sweep(path: str) -> dict:
    """The sweep saved in the results JSON at `path` (its key 'seed_sweep')."""
    try:
        return json.loads(Path(path).read_text())[SECTION]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--from-json {path}: no seed sweep read ({type(e).__name__}: {e}); give the "
                         f"--json file a sweep wrote (default WORK/seed_sweep.json)") from None


# What sweeps must share to be one table (the code may differ by commits that left the package alone).
SAME = ("pairs", "fast", "overrides", "alpha")


def merge_sweeps(sweeps: list[dict]) -> dict:
    """Several sweeps of the same settings and distinct seeds (e.g. run side by side) as one."""
    first = sweeps[0]
    for i, s in enumerate(sweeps[1:], 2):
        other = [k for k in SAME if s[k] != first[k]]
        if other:
            raise SystemExit(f"--from-json: sweep {i} differs from sweep 1 in {', '.join(other)} "
                             f"({', '.join(f'{k}={s[k]!r} against {first[k]!r}' for k in other)}); "
                             "merge only sweeps of the same settings")
    seeds = [x for s in sweeps for x in s["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--from-json: a seed is in more than one sweep ({seeds}); give each seed once")
    seconds = [x for s in sweeps for x in s["seconds"]]
    join = lambda k: "; ".join(dict.fromkeys(s[k] for s in sweeps))  # noqa: E731
    stats = [r for s in sweeps for r in s.get("stats") or []]
    return {**first, "seeds": seeds, "rows": [r for s in sweeps for r in s["rows"]], "stats": stats, "seconds": seconds,
            "n_random": [x for s in sweeps for x in s["n_random"]], "seconds_per_seed": float(np.mean(seconds)),
            "code": join("code"), "stamp": join("stamp"), "versions": join("versions")}


def read_run(work: str, seed: int, pairs: list[str]) -> dict:
    """{pair: summary} of the finished run WORK/seed<seed> (read only)."""
    path = Path(work) / f"seed{seed}" / "report" / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--runs: {path}: no summary read ({type(e).__name__}: {e}); give the --work "
                         f"directory whose seed<s> runs made the sweep") from None
    have = list(summary.get("pairs") or {})
    missing = [p for p in pairs if p not in have]
    if missing:
        raise SystemExit(f"--runs: {path} has no pair {', '.join(missing)} (it has {', '.join(have) or 'none'})")
    return summary["pairs"]


def stats_from_runs(result: dict, work: str) -> dict:
    """`result` with its statistics read from the summaries of its runs WORK/seed<s>, checked to be
    the sweep's runs: each run's causal-check rows must be the rows the sweep kept for that seed."""
    stats, commits = [], []
    for seed in result["seeds"]:
        pairs = read_run(work, seed, result["pairs"])
        kept = [r for r in result["rows"] if r["seed"] == seed]
        found = [r for p in result["pairs"] for r in seed_rows(seed, p, pairs[p])]
        if found != kept:
            raise SystemExit(f"--runs: {Path(work) / f'seed{seed}'} is not this sweep's run of seed {seed}: its "
                             "causal-check results differ from the sweep's (rerun or overwritten since); "
                             "give the --work directory the sweep ran in, or rerun the sweep")
        stats += [r for p in result["pairs"] for r in stat_rows(seed, p, pairs[p])]
        env = next(iter(pairs.values())).get("environment") or {}
        commits.append(str((env.get("sparcom_jax") or {}).get("commit") or "?")[:7])
    where = f"{Path(work)}/seed<s>, runs at {', '.join(dict.fromkeys(commits))}"
    return {**result, "stats": stats, "stats_from": where}


def write_docs(result: dict, path: str | None) -> None:
    if path:
        replace_section(Path(path), section_key(result["pairs"]), section(result))
        if result.get("stats"):
            replace_section(Path(path), f"{STATS_SECTION}:{'+'.join(result['pairs'])}", stats_section(result))
        print(f"seed_sweep: table written to {path}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="K: seeds 0 .. K-1 (default 5)")
    ap.add_argument("--seed-list", default=None, help="comma-separated seeds instead of 0 .. K-1")
    ap.add_argument("--pairs", default="mixtral", help="comma-separated demo pairs (default: mixtral, the MoE)")
    ap.add_argument("--fast", action="store_true", help="the demo's fast mode (a smoke run, not a result)")
    ap.add_argument("--override", action="append", default=[], help="an extra demo config override KEY=VALUE")
    ap.add_argument("--work", default="runs/seed_sweep", help="directory of the demo runs (WORK/seed<s>)")
    ap.add_argument("--overwrite", action="store_true", help="recompute outputs made with other settings")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--json", default=None, help="results JSON (default WORK/seed_sweep.json), key 'seed_sweep'")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "analysis.md"), help="page whose section is rewritten")
    ap.add_argument("--no-docs", action="store_true", help="write no docs table")
    ap.add_argument("--from-json", nargs="+", default=None,
                    help="only rewrite the table from results JSONs (several: sweeps of other seeds, merged)")
    ap.add_argument("--runs", default=None, metavar="WORK",
                    help="with --from-json: read the statistics from the finished runs WORK/seed<s> (read only)")
    args = ap.parse_args(argv)
    docs = None if args.no_docs else args.docs
    if args.runs and not args.from_json:
        raise SystemExit("--runs reads the statistics of a saved sweep's runs: give --from-json too")
    if args.from_json:
        result = merge_sweeps([load_sweep(f) for f in args.from_json])
        if args.runs:
            result = stats_from_runs(result, args.runs)
            update_results(args.json, SECTION, result)
        write_docs(result, docs)
        return 0
    args.pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    seeds = ([int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds)))
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds/--seed-list: {seeds}: seeds must be distinct and >= 0")
    sweep_config(seeds[0], args.pairs, args.fast, args.override)  # bad pairs or overrides stop here
    json_path = args.json or str(Path(args.work) / "seed_sweep.json")
    result = {"seeds": [], "pairs": args.pairs, "fast": args.fast, "overrides": args.override,
              "alpha": args.alpha, "rows": [], "stats": [], "n_random": [], "seconds": [], "code": code_version(),
              "stamp": stamp(), "versions": _versions(), "seconds_per_seed": 0.0}
    from sparcom_jax.errors import ConfigError, LockedError

    for seed in seeds:
        try:
            rows, stats, n_random, took = run_seed(seed, args)
        except (ConfigError, LockedError) as e:  # stale outputs (--overwrite), a bad override, a busy WORK
            done = f"; the seeds finished before it are in {json_path}" if result["seeds"] else ""
            raise SystemExit(f"seed_sweep: seed {seed}: {e}{done}") from None
        result["seeds"].append(seed)
        result["rows"] += rows
        result["stats"] += stats
        result["n_random"].append(n_random)
        result["seconds"].append(took)
        result["seconds_per_seed"] = float(np.mean(result["seconds"]))
        update_results(json_path, SECTION, result)  # after every seed: a stopped sweep keeps what it ran
        print(f"seed_sweep: seed {seed} done in {took:.0f} s", file=sys.stderr)
    write_docs(result, docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
