"""The controls in summary.json and the report: templates, the same-template control, the
contrast rule, per-category diagonal, set size vs length, top instructions, matched ablation
controls and precision."""

import csv
import html as htmllib
import json
import re

import numpy as np
import pytest

from sparcom_jax.analysis import (
    IdentifyConfig, ablate_identification, analyze_model, build_summary, compare_models, same_template_control,
)
from sparcom_jax.analysis.identify import RULE_SUPPORT
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.report import write_report
from sparcom_jax.report.writer import SAME_TEMPLATE_TEXT
from sparcom_jax.stats.counts import Counts

N_PER, L, F = 4, 2, 10


def dense_counts(seed, shift=0.0):
    """Category c prefers neurons 2c, 2c+1; half the records human-written; ids r<i>."""
    rng = np.random.default_rng(seed)
    n = 6 * N_PER
    t = rng.integers(4, 16, n)
    p = rng.random((n, L, F)) * 0.4 + shift
    for i in range(n):
        c = i // N_PER
        p[i, :, 2 * c:2 * c + 2] += 0.55
    c = np.minimum((p * t[:, None, None]).astype(np.int32), t[:, None, None])
    return Counts(tokens=t, neuron_active=c, neuron_act_sum=c * rng.random((n, L, F)).astype(np.float32),
                  categories=[CATEGORIES[i // N_PER] for i in range(n)], ids=[f"r{i}" for i in range(n)],
                  sources=["human-written" if i % 2 else "template-varied" for i in range(n)])


def loss_fn(sets):
    def fn(mask):
        fn.last_dropped_mass = None if mask is None else 0.01 * float(mask.sum())
        return {c: 2.0 + (0.0 if mask is None else 0.3 * (mask & sets[c]).sum() + 0.01 * mask.sum())
                for c in CATEGORIES}
    return fn


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    cfg = IdentifyConfig(eps=0.1, ties="break")
    kw = dict(n_boot=8, n_perm=19, top_units=3, top_per_unit=2)
    base = analyze_model(dense_counts(0), cfg, name="base", **kw)
    tuned = analyze_model(dense_counts(1, shift=0.2), cfg, name="tuned", **kw)
    tuned_plain = analyze_model(dense_counts(2, shift=0.2), cfg, name="tuned@plain", **kw)
    comp = compare_models(base, tuned)
    control = same_template_control(base, tuned, tuned_plain)
    abl = ablate_identification(base["isn"].ident, loss_fn(base["isn"].ident.sets()), n_random=3, neighbours=3)
    precision = {"isn": {c: 0.9 + 0.01 * i for i, c in enumerate(CATEGORIES)}, "note": "demo models, CPU"}
    summary = build_summary({"base": base, "tuned": tuned}, comparison=comp, ablation=abl,
                            templates={"base": "plain", "tuned": "chat"},
                            controls={"same_template": control, "other_seed": control}, precision=precision,
                            scope="content")
    out = tmp_path_factory.mktemp("report_controls")
    write_report(out, summary, analyses={"base": base, "tuned": tuned}, dpi=30)
    return out, summary


def read_csv(path):
    with open(path) as f:
        rows = list(csv.reader(line for line in f if not line.startswith("#")))
    return rows[0], rows[1:]


def test_summary_carries_the_controls(report):
    out, summary = report
    loaded = json.loads((out / "summary.json").read_text())
    assert loaded == summary
    assert loaded["templates"] == {"base": "plain", "tuned": "chat"}
    assert loaded["rule_support"] == RULE_SUPPORT
    assert loaded["identification"]["ties"] == "break"
    assert loaded["controls"]["same_template"]["after"] == "tuned@plain"
    assert loaded["precision"]["note"] == "demo models, CPU"
    s = loaded["models"]["base"]["isn"]
    assert s["contrast"]["identification"]["rule"] == "absolute"
    assert set(s["per_category_dominance"]) == set(CATEGORIES)
    assert s["human_subset"]["n"] == 12 and s["permutation"]["stratified_by"] == "source"
    assert len(s["set_size_vs_length"]["tokens"]) == 6 * N_PER
    # Exact-k: every instruction has k = 2 units (all fired: p > 0 on the preferred neurons).
    assert s["set_size_vs_length"]["set_size"] == [2] * (6 * N_PER)
    assert all(len(s["top_instructions"][c]) <= 3 for c in CATEGORIES)
    e = loaded["comparison"]["isn"]["code"]["contrast"]
    assert e["retained"] + e["gained"] == e["size_after"]
    ab = loaded["ablation"]["neurons"]
    assert ab["matching"]["nearest_frequency"] == 3 and ab["n_random"] == 3
    sizes = ab["set_sizes"]
    assert ab["dropped_mass"] == {c: pytest.approx(0.01 * sizes[c]) for c in CATEGORIES}


def test_html_shows_and_explains_the_controls(report):
    out, summary = report
    page = htmllib.unescape((out / "index.html").read_text())
    assert page.count(SAME_TEMPLATE_TEXT) == 1  # said once, under the same-template control only
    assert "Control 'other_seed' (base → tuned@plain)" in page
    assert "base and tuned were counted with different templates" in page
    assert RULE_SUPPORT["top"] in page and RULE_SUPPORT["absolute"] in page
    assert "Control 'same_template' (base → tuned@plain)" in page
    assert "(absolute, contrast rule; mean p = mean frequency over all units)" in page
    assert "within each record source" in page
    assert "Set Jaccard between bfloat16 and float32 counts" in page and "note: demo models, CPU" in page
    assert "<td>0.93</td>" in page  # precision of GEN
    assert "diagonal dominance per category" in page
    first = summary["models"]["base"]["isn"]["top_instructions"]["code"][0]["instructions"][0]
    assert f"<td>{first['id']}</td>" in page
    assert "set_size_vs_length_isn.png" in {p.name for p in (out / "figures").iterdir()}
    assert ("same number of units per layer, each unit of the set replaced by one of the 3 units nearest to it in "
            "activation frequency") in page


def test_csv_tables_of_the_controls(report):
    out, summary = report
    header, rows = read_csv(out / "tables" / "control_same_template_isn.csv")
    ctrl = summary["controls"]["same_template"]["isn"]
    for r in rows:
        assert [int(x) for x in r[1:6]] == [ctrl[r[0]][k] for k in
                                           ("size_before", "size_after", "retained", "gained", "lost")]
    header, rows = read_csv(out / "tables" / "comparison_isn.csv")
    col = header.index("contrast_gained")
    assert [int(r[col]) for r in rows] == [summary["comparison"]["isn"][c]["contrast"]["gained"]
                                           for c in CATEGORIES]
    header, rows = read_csv(out / "tables" / "base_isn_dominance.csv")
    s = summary["models"]["base"]["isn"]
    assert [r[0] for r in rows] == [*CATEGORIES, "overall"]
    assert np.allclose([float(r[1]) for r in rows[:6]], [s["per_category_dominance"][c] for c in CATEGORIES],
                       atol=1e-5)
    assert float(rows[6][4]) == pytest.approx(s["permutation"]["p_value"])
    assert float(rows[6][2]) == pytest.approx(s["bootstrap"]["diagonal_dominance"]["low"], abs=1e-5)
    assert float(rows[6][3]) == pytest.approx(s["bootstrap"]["diagonal_dominance"]["high"], abs=1e-5)
    assert float(rows[0][2]) == pytest.approx(s["bootstrap"]["per_category_dominance"]["low"][0], abs=1e-5)
    assert float(rows[0][5]) == pytest.approx(s["human_subset"]["per_category_dominance"]["classification"],
                                              abs=1e-5)
    header, rows = read_csv(out / "tables" / "precision.csv")
    assert header == ["category", "isn"] and float(rows[3][1]) == pytest.approx(0.93)
    header, rows = read_csv(out / "tables" / "ablation_neurons_baseline.csv")
    ab = summary["ablation"]["neurons"]
    assert float(rows[1][header.index("dropped_mass")]) == pytest.approx(ab["dropped_mass"]["code"])
    assert float(rows[1][header.index("excess_own_std")]) == pytest.approx(ab["excess_std"][1][1], abs=1e-5)
    header, rows = read_csv(out / "tables" / "base_isn_top_instructions.csv")
    top = s["top_instructions"]["classification"][0]
    assert rows[0][:5] == ["classification", f"L{top['layer']}/N{top['neuron']}",
                           f"{top['category_frequency']:.6g}", "1", top["instructions"][0]["id"]]
    header, rows = read_csv(out / "tables" / "base_isn_set_size_vs_length.csv")
    # Exact-k sets are all of size 2: no rank correlation with length (undefined -> empty cell).
    assert s["set_size_vs_length"]["spearman"] is None
    assert rows[-1][0] == "all" and rows[-1][1] == str(6 * N_PER) and rows[-1][4] == ""
    assert float(rows[0][3]) == pytest.approx(2.0)


@pytest.mark.parametrize("templates,said", [
    ({"base": "plain", "mid": "chat", "tuned": "chat"}, "(plain: base; chat: mid, tuned)"),
    ({"base": "chat", "mid": "chat", "tuned": "chat"}, None),
])
def test_series_caption_says_when_its_checkpoints_used_different_templates(tmp_path, templates, said):
    # A fine-tuning run counts the base under its own template and every checkpoint under the
    # training template: the series' Jaccard with the first checkpoint then holds the template
    # change as well, which the main comparison's template note does not say of the series.
    from sparcom_jax.analysis import compare_series

    cfg, kw = IdentifyConfig(eps=0.1), dict(n_boot=0, n_perm=0, top_units=0)
    ms = {n: analyze_model(dense_counts(i, shift=0.1 * i), cfg, name=n, **kw)
          for i, n in enumerate(("base", "mid", "tuned"))}
    summary = build_summary(ms, comparison=compare_models(ms["base"], ms["tuned"]),
                            series=compare_series(list(ms.items())), templates=templates)
    write_report(tmp_path, summary, dpi=20)
    page = htmllib.unescape((tmp_path / "index.html").read_text())
    note = "The checkpoints were counted under different templates"
    if said is None:
        assert note not in page and "series_isn.png" in page
    else:
        assert f"{note} {said}, so a change between two checkpoints of different templates" in page
        assert page.count(note) == 1


def test_template_effect_in_table_and_page(report):
    """The control's table and the page carry main-minus-control with its paired interval, the
    same numbers as summary.json, whose estimate is the two comparisons' difference."""
    out, summary = report
    ctrl, main = summary["controls"]["same_template"]["isn"], summary["comparison"]["isn"]
    header, rows = read_csv(out / "tables" / "control_same_template_isn.csv")
    page = htmllib.unescape((out / "index.html").read_text())
    for r in rows:
        eff = ctrl[r[0]]["template_effect"]["jaccard"]
        assert eff["estimate"] == pytest.approx(main[r[0]]["jaccard"] - ctrl[r[0]]["jaccard"])
        got = [float(r[header.index(f"template_effect_jaccard{b}")]) for b in ("", "_low", "_high")]
        assert got == pytest.approx([eff["estimate"], eff["low"], eff["high"]], abs=1e-6)
        assert eff["low"] <= eff["high"]
    said = page[page.index("Template effect on the Jaccard (main comparison minus this control): CLS"):]
    for c, short in zip(CATEGORIES, ("CLS", "CODE", "QA", "GEN", "MATH", "SUM")):
        e = ctrl[c]["template_effect"]["jaccard"]
        assert f"{short} {e['estimate']:+.3g} [{e['low']:+.3g}, {e['high']:+.3g}]" in said.split(", with")[0]
    assert any(ctrl[c]["template_effect"]["jaccard"]["low"] < ctrl[c]["template_effect"]["jaccard"]["high"]
               for c in CATEGORIES)
    assert "with 95% paired bootstrap intervals over 8 resamples" in page
    assert "template_effect_jaccard" not in read_csv(out / "tables" / "comparison_isn.csv")[0]


def test_holm_and_length_matched_columns_of_the_dominance_table(report):
    """The per-category permutation p-values Holm-adjusted (against a brute-force Holm) and the
    length-matched test reach the dominance table with the summary's values."""
    out, summary = report
    s = summary["models"]["base"]["isn"]
    p = np.asarray(s["permutation"]["per_category_p_value"], float)
    order = np.argsort(p, kind="stable")
    holm = np.empty(6)
    running = 0.0
    for rank, i in enumerate(order):  # step-down: (m - rank) * p, kept monotone, capped at 1
        running = max(running, min(1.0, (6 - rank) * p[i]))
        holm[i] = running
    header, rows = read_csv(out / "tables" / "base_isn_dominance.csv")
    col = header.index("permutation_p_holm")
    assert [float(r[col]) for r in rows[:6]] == pytest.approx(list(holm), abs=1e-6) and rows[6][col] == ""
    lm = s["length_matched"]
    assert float(rows[6][header.index("length_matched_permutation_p")]) == pytest.approx(lm["p_value"])
    assert float(rows[6][header.index("length_matched_null_mean")]) == pytest.approx(lm["null_mean"], abs=1e-6)
    assert float(rows[2][header.index("length_matched_permutation_p")]) == pytest.approx(
        lm["per_category_p_value"][2])


def test_series_text_says_when_the_trends_carry_no_interval():
    from sparcom_jax.report.writer import _series_change_text

    assert "carry no intervals" in _series_change_text({"bootstrap": None}, ["a", "b"])


def _three_categories():
    """Analyses of three models of the records of the first three categories (none of GEN, MATH, SUM)."""
    keep = N_PER * 3
    ms = {}
    for i, n in enumerate(("base", "mid", "tuned")):
        c = dense_counts(i, shift=0.1 * i)
        ms[n] = analyze_model(Counts(tokens=c.tokens[:keep], neuron_active=c.neuron_active[:keep],
                                     categories=c.categories[:keep], ids=c.ids[:keep]),
                              IdentifyConfig(eps=0.1), name=n, n_boot=8, n_perm=0, top_units=0)
    return ms


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(r for r in f if not r.startswith("#")))


def test_a_series_of_some_categories_leaves_the_missing_ones_out_of_its_tables_and_figure(tmp_path):
    """A series over three categories wrote 0 sizes, uniques and retained/gained/lost (and a change of
    +0 [0, 0]) for the three it had no records of in tables/series_isn*.csv, and drew them as flat
    lines at 0: a reader takes that for a measured empty set. Their cells are now empty, their
    lines not drawn, and the caption and legend say why; measured categories keep their values."""
    from sparcom_jax.analysis import compare_series
    from sparcom_jax.report import figures as F

    ms = _three_categories()
    series = compare_series(list(ms.items()))
    write_report(tmp_path, build_summary(ms, series=series), dpi=20)
    absent, present = CATEGORIES[3:], CATEGORIES[:3]
    t = series["isn"]
    assert all(t["per_category_count"][c] == [0, 0, 0] for c in absent)  # in the data: 0 ...
    rows = _csv_rows(tmp_path / "tables" / "series_isn.csv")
    for r in rows:  # ... in the table: nothing
        figures = {k: v for k, v in r.items() if k not in ("checkpoint", "category", "n_instructions")}
        if r["category"] in absent:
            assert r["n_instructions"] == "0" and set(figures.values()) == {""}, r
        else:
            assert r["n_instructions"] == str(N_PER) and r["size"] != "" and r["size_low"] != "", r
    sizes = {(r["checkpoint"], r["category"]): r["size"] for r in rows}
    assert all(sizes[(n, c)] == str(t["per_category_count"][c][i]) for i, n in enumerate(ms) for c in present)
    change = _csv_rows(tmp_path / "tables" / "series_isn_change.csv")
    assert {r["change"] for r in change if r["category"] in absent} == {""}
    assert all(r["change"] != "" for r in change if r["category"] in present)
    fig = F.series_trends(list(ms), t, "series")
    drawn = {line.get_label() for line in fig.axes[0].get_lines()}
    assert drawn == {"CLS", "CODE", "QA"}
    assert "GEN, MATH, SUM" in fig.axes[0].get_legend().get_title().get_text()
    page = htmllib.unescape((tmp_path / "index.html").read_text())
    assert ("GEN, MATH, SUM have no instructions in this study: nothing was measured for them, so they are not "
            "drawn and their cells in the series tables are empty, not 0.") in page
    said = page[page.index("Change from base to tuned"):]
    said = said.split(". A change")[0]
    assert "(GEN, MATH, SUM: no instructions)" in said and not any(f"{s} +" in said for s in ("GEN", "MATH", "SUM"))
    assert all(f"{s} +" in said or f"{s} -" in said for s in ("CLS", "CODE", "QA"))


def test_a_comparison_of_some_categories_leaves_the_missing_ones_out_of_its_tables_and_figure(tmp_path):
    """The before/after comparison likewise wrote 0 sizes and retained/gained/lost for the categories
    without records (CSV and page) and drew them as empty bars under "J=n/a"."""
    from sparcom_jax.report import figures as F

    ms = _three_categories()
    comp = compare_models(ms["base"], ms["tuned"])
    write_report(tmp_path, build_summary(ms, comparison=comp), dpi=20)
    absent = CATEGORIES[3:]
    assert all(comp["isn"][c]["retained"] == 0 and comp["isn"][c]["size_before"] == 0 for c in absent)
    for name in ("comparison_isn", "comparison_isn_per_layer"):
        for r in _csv_rows(tmp_path / "tables" / f"{name}.csv"):
            figures = {k: v for k, v in r.items() if k not in ("category", "layer")}
            assert (set(figures.values()) == {""}) == (r["category"] in absent), (name, r)
    page = htmllib.unescape((tmp_path / "index.html").read_text())
    assert "(– for GEN, MATH, SUM: no instructions, nothing measured)" in page
    table = page[page.index("base → tuned: neurons per category"):]
    table = table[:table.index("</table>")]
    assert re.search(r"<tr><td>generation</td>(<td>–</td>){6,}</tr>", table)  # |S| before/after, retained, ...
    assert "<tr><td>code</td><td>–</td>" not in table
    assert "GEN, MATH, SUM have no instructions: nothing was measured, so they have no bars" in page
    fig = F.comparison_bars(comp["isn"], "comparison", "base", "tuned")
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels[3:] == ["no\nrecords"] * 3 and all(x.startswith("J=") for x in labels[:3])
