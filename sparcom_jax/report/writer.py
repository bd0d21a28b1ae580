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
from typing import Mapping

from sparcom_jax.analysis.pipeline import ModelAnalysis
from sparcom_jax.categories import CATEGORIES, SHORT_NAMES
from sparcom_jax.report import figures as F
from sparcom_jax.report.export import export_sets
from sparcom_jax.report.html import FigureBlock, TableBlock, TextBlock, render_html
from sparcom_jax.report.io import atomic_write, write_csv, write_json
from sparcom_jax.report.tables import all_tables, safe_name

SECTION_TITLES = {
    "isn": "Instruction-specific neurons (ISNs)",
    "ise": "Instruction-specific experts (ISEs)",
    "expert_neurons": "Instruction-specific expert neurons (MoE)",
}
UNIT_WORD = {"isn": "neurons", "ise": "experts", "expert_neurons": "expert neurons"}

CAPTIONS = {
    "overlap": "Category-level overlap: cell (a, b) is the Jaccard index |S(a)∩S(b)| / |S(a)∪S(b)| "
               "of the two categories' {units}, one panel per model. Bright off-diagonal cells mean two "
               "kinds of instruction share {units}; the diagonal is 1 by definition.",
    "instruction_overlap": "Instruction-level overlap: cell (a, b) is the mean Jaccard of S(I), S(I') over "
                           "instructions I in a and I' in b (self-pairs excluded on the diagonal). A "
                           "diagonal brighter than its row means instructions of the same type share more "
                           "{units} than instructions of different types.",
    "instruction_matrix": "Jaccard of every pair of instructions, ordered by category (white lines separate "
                          "categories; colour scale clipped to the off-diagonal range). Bright diagonal "
                          "blocks mean same-type instructions use the same {units}.",
    "layers": "Number of {units} of each category per layer (0-based), one line per model. Dashed lines "
              "mark where the three phases (early, middle, late) start for each model, found by the "
              "best three-step fit of the profile.",
    "generality": "Left: set size |S(c)| (light) and its unique part |U(c)| (dark). Middle: the share "
                  "of each set that no other category has. Right: in how many categories each selected "
                  "unit appears; the bar at 6 is the general set (count and share of the union in the "
                  "legend).",
    "comparison": "How each category's set changed from {before} to {after}: the left bar is the set "
                  "before (retained + lost), the right bar the set after (retained + gained); J is the "
                  "Jaccard of before and after.",
    "ise_frequency": "Mean routing frequency of every (layer, expert) pair over each category's "
                     "instructions (model {model}). Rows are layers, columns experts; bright cells are "
                     "experts the category routes to often.",
    "expert_neurons_count": "Number of instruction-specific expert neurons in every (layer, expert) "
                            "pair per category (model {model}).",
    "series": "The same figures along the checkpoint series: set sizes, uniqueness, Jaccard with the "
              "first and the previous checkpoint, generality and the instruction-level diagonal "
              "dominance (mean diagonal minus mean off-diagonal).",
    "ablation": "Causal check ({kind}): cell (a, b) is the increase of the mean loss on category b's "
                "reference responses when category a's set is switched off. Left: the instruction-"
                "specific set; middle: random sets with the same per-layer counts (mean of {n} draws); "
                "right: their difference. A red diagonal on the right means each category's set matters "
                "most for its own category, beyond what removing as many random units does.",
}


def _bootstrap_text(s: dict) -> str:
    perm = s.get("permutation") or {}
    parts = []
    if s.get("diagonal_dominance") is not None:
        parts.append(f"Instruction-level diagonal dominance: {s['diagonal_dominance']:.4f}")
    if perm.get("p_value") is not None:
        parts.append(f"permutation test p = {perm['p_value']:.4g} ({perm['n_perm']} shuffles of the "
                     "category labels)")
    b = s.get("bootstrap")
    if b:
        parts.append(f"{b['ci']:.0%} bootstrap intervals over instructions ({b['n_boot']} resamples) "
                     "are in summary.json and the categories table")
    return "; ".join(parts) + "." if parts else ""


def _category_table(name: str, section: str, s: dict) -> TableBlock:
    return TableBlock(
        f"{name}: {UNIT_WORD[section]} per category",
        ["category", "instructions", "|S(c)|", "|U(c)|", "|U(c)|/|S(c)|", "mean |S(I)|"],
        [[c, s["n_per_category"][c], s["per_category_count"][c], s["unique"][c], s["unique_ratio"][c],
          s["mean_instruction_set_size"][c]] for c in CATEGORIES]
        + [["general (all six)", None, s["general"], None, s["general_share"], None]])


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
    out = os.fspath(out_dir)
    written: dict[str, list[str]] = {k: [] for k in ("summary", "tables", "figures", "sets", "html")}
    written["summary"].append(write_json(os.path.join(out, "summary.json"), summary))

    rule = " ".join(f"{k}={v}" for k, v in summary["identification"].items())
    for t in all_tables(summary):
        written["tables"].append(write_csv(os.path.join(out, "tables", t.name + ".csv"), t.header, t.rows,
                                           comments=[f"identification: {rule}"]))

    if analyses:
        for name, ma in analyses.items():
            for fa in ma.fields.values():
                written["sets"].extend(export_sets(os.path.join(out, "sets"), fa.ident,
                                                   prefix=safe_name(name) + "_"))

    blocks: list = []

    def add(fig, filename: str, fig_title: str, caption: str):
        png = F.to_png(fig, dpi=dpi)
        written["figures"].append(atomic_write(os.path.join(out, "figures", filename), png))
        blocks.append(FigureBlock(fig_title, png, caption, filename))

    models = summary["models"]
    blocks.append(TextBlock("Set-up", heading=True))
    blocks.append(TextBlock(json.dumps({k: summary.get(k) for k in (
        "identification", "model_paths", "data", "scope")}, indent=2), pre=True))
    blocks.append(TextBlock("Categories: " + ", ".join(f"{c} ({SHORT_NAMES[c]})" for c in CATEGORIES)
                            + ". Layers are numbered from 0."))

    sections = [s for s in SECTION_TITLES if any(s in m for m in models.values())]
    comp = summary.get("comparison") or {}
    series = summary.get("series") or {}
    for sec in sections:
        units = UNIT_WORD[sec]
        have = {n: m[sec] for n, m in models.items() if sec in m}
        blocks.append(TextBlock(SECTION_TITLES[sec], heading=True))
        for n, s in have.items():
            blocks.append(_category_table(n, sec, s))
            txt = _bootstrap_text(s)
            if txt:
                blocks.append(TextBlock(f"{n}: {txt}"))
        add(F.overlap_heatmaps({n: s["overlap_jaccard"] for n, s in have.items()},
                               f"{SECTION_TITLES[sec]}: category overlap"),
            f"overlap_{sec}.png", "Category overlap", CAPTIONS["overlap"].format(units=units))
        inst = {n: s["instruction_overlap"] for n, s in have.items() if s.get("instruction_overlap")}
        if inst:
            add(F.overlap_heatmaps(inst, f"{SECTION_TITLES[sec]}: instruction-level overlap",
                                   label="mean pairwise Jaccard"),
                f"instruction_overlap_{sec}.png", "Instruction-level overlap",
                CAPTIONS["instruction_overlap"].format(units=units))
        for n, ma in (analyses or {}).items():
            fa = ma.fields.get(sec)
            if fa is not None and fa.instruction_matrix is not None:
                add(F.instruction_heatmap(fa.instruction_matrix, fa.ident.labels, f"{n}: {units}"),
                    f"instruction_matrix_{safe_name(n)}_{sec}.png", f"Instruction x instruction ({n})",
                    CAPTIONS["instruction_matrix"].format(units=units))
        add(F.layer_distribution({n: s["per_layer"] for n, s in have.items()},
                                 f"{SECTION_TITLES[sec]}: layer distribution",
                                 phases={n: s["phases"] for n, s in have.items()}, ylabel=f"{units}"),
            f"layers_{sec}.png", "Layer distribution", CAPTIONS["layers"].format(units=units))
        add(F.generality_uniqueness(have, f"{SECTION_TITLES[sec]}: generality and uniqueness"),
            f"generality_{sec}.png", "Generality and uniqueness", CAPTIONS["generality"])
        if sec in comp:
            b, a = comp["before"], comp["after"]
            add(F.comparison_bars(comp[sec], f"{SECTION_TITLES[sec]}: {b} → {a}", b, a),
                f"comparison_{sec}.png", f"Comparison {b} → {a}",
                CAPTIONS["comparison"].format(before=b, after=a))
            keys = ["size_before", "size_after", "retained", "gained", "lost", "jaccard"]
            blocks.append(TableBlock(f"{b} → {a}: {units} per category", ["category", *keys],
                                     [[c, *[comp[sec][c][k] for k in keys]] for c in CATEGORIES]))
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
                f"series_{sec}.png", "Checkpoint series", CAPTIONS["series"])

    ablation = summary.get("ablation") or {}
    for kind in ("neurons", "experts"):
        d = ablation.get(kind)
        if not d:
            continue
        blocks.append(TextBlock(f"Causal check: ablating {kind}", heading=True))
        add(F.ablation_matrices(d["isn"], d["random"], f"Loss increase when {kind} are switched off"),
            f"ablation_{kind}.png", f"Ablation ({kind})",
            CAPTIONS["ablation"].format(kind=kind, n=d["n_random"]))
        blocks.append(TableBlock(f"Ablation ({kind}): loss increase, ablated (rows) x evaluated",
                                 ["ablated \\ evaluated", *[SHORT_NAMES[c] for c in CATEGORIES]],
                                 [[c, *row] for c, row in zip(CATEGORIES, d["isn"])]))

    blocks.append(TextBlock("Files", heading=True))
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    blocks.append(TextBlock("\n".join(rel(p) for k in ("summary", "tables", "sets") for p in written[k]),
                            pre=True))
    written["html"].append(atomic_write(os.path.join(out, "index.html"), render_html(title, blocks)))
    return written
