"""What a reader of the report sees: every headline with its interval and denominator, captions
true in edge cases (empty sets), no empty figure, legends and titles that hide nothing."""

import csv
import html as htmllib
import re

import numpy as np
import pytest

from sparcom_jax.analysis import IdentifyConfig, analyze_model, build_summary
from sparcom_jax.categories import CATEGORIES
from sparcom_jax.pipeline.demo import DEMO_CAVEAT, write_demo_report
from sparcom_jax.report import figures as F
from sparcom_jax.report import write_report
from sparcom_jax.stats.counts import Counts
from test_report_controls import dense_counts

MATH = CATEGORIES.index("math")


def silenced(counts, cats=None):
    """The counts with the instructions of `cats` (default: all) firing nothing."""
    lab = np.array([CATEGORIES.index(c) for c in counts.categories])
    na = counts.neuron_active.copy()
    na[np.isin(lab, cats if cats is not None else range(len(CATEGORIES)))] = 0
    return Counts(tokens=counts.tokens, neuron_active=na, categories=counts.categories, ids=counts.ids,
                  sources=counts.sources)


def page_of(out):
    return htmllib.unescape((out / "index.html").read_text())


def read_csv(path):
    with open(path) as f:
        rows = list(csv.reader(line for line in f if not line.startswith("#")))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def math_empty(tmp_path_factory):
    """One model whose math instructions fire nothing: S(math) is empty."""
    base = analyze_model(silenced(dense_counts(0), [MATH]), IdentifyConfig(eps=0.1), name="base",
                         n_boot=8, n_perm=9)
    summary = build_summary({"base": base})
    out = tmp_path_factory.mktemp("math_empty")
    write_report(out, summary, analyses={"base": base}, dpi=30)
    return out, summary


def test_overlap_caption_holds_when_a_category_set_is_empty(math_empty):
    out, summary = math_empty
    s = summary["models"]["base"]["isn"]
    assert s["per_category_count"]["math"] == 0 and s["overlap_jaccard"][MATH][MATH] is None
    cap = re.search(r'<figure id="overlap_isn.png">.*?<figcaption>(.*?)</figcaption>', page_of(out), re.S).group(1)
    assert "1 by definition" not in cap
    assert "Empty sets (blank row and column): base: MATH." in cap


def test_category_table_shows_intervals_and_general_its_denominator(math_empty):
    out, summary = math_empty
    s = summary["models"]["base"]["isn"]
    b = s["bootstrap"]
    page = page_of(out)
    table = re.search(r"<caption>base: neurons per category \(low / high: 95% bootstrap.*?</table>", page, re.S).group(0)
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
    assert [r[0] for r in rows] == list(CATEGORIES)  # no "general" row under the |U(c)|/|S(c)| column
    i = CATEGORIES.index("code")
    assert [float(x) for x in rows[i][2:8]] == pytest.approx(
        [s["per_category_count"]["code"], b["per_category_count"]["low"][i], b["per_category_count"]["high"][i],
         s["unique"]["code"], b["unique"]["low"][i], b["unique"]["high"][i]], rel=1e-3)
    assert rows[MATH][8] == "–"  # |U|/|S| of an empty set: undefined, not 0
    assert (f"base: {s['general']} neurons are in all six categories' sets (general), "
            f"{s['general_share']:.1%} of the {s['union']} neurons in at least one set (the union); "
            f"95% bootstrap interval {b['general']['low']:.4g} to {b['general']['high']:.4g} neurons") in page


def test_headline_diagonal_with_interval_resolution_and_caveats(math_empty):
    out, summary = math_empty
    s = summary["models"]["base"]["isn"]
    lo, hi = s["bootstrap"]["diagonal_dominance"]["low"], s["bootstrap"]["diagonal_dominance"]["high"]
    page = page_of(out)
    assert (f"Instruction-level diagonal dominance: {s['diagonal_dominance']:.4g} (95% bootstrap interval "
            f"{lo:.4g} to {hi:.4g}); one-sided permutation test p = {s['permutation']['p_value']:.4g}") in page
    assert "the smallest possible p is 0.1" in page  # 9 shuffles
    assert "treat the records as independent draws" in page
    assert "8 resamples are too few" in page


def test_csv_tables_carry_the_intervals(math_empty):
    out, summary = math_empty
    s = summary["models"]["base"]["isn"]
    for key in ("overlap_jaccard", "instruction_overlap"):
        for bound in ("low", "high"):
            _, rows = read_csv(out / "tables" / f"base_isn_{key}_{bound}.csv")
            got = np.array([[np.nan if x == "" else float(x) for x in r[1:]] for r in rows])
            want = np.array(s["bootstrap"][key][bound], dtype=float)
            assert np.allclose(got, want, atol=1e-5, equal_nan=True), (key, bound)
    _, rows = read_csv(out / "tables" / "base_isn_generality.csv")
    d = dict((r[0], r[1]) for r in rows)
    assert float(d["general_high"]) == pytest.approx(s["bootstrap"]["general"]["high"], abs=1e-5)
    assert float(d["diagonal_dominance_low"]) == pytest.approx(s["bootstrap"]["diagonal_dominance"]["low"],
                                                               abs=1e-5)
    assert d["bootstrap_n"] == "8"
    header, rows = read_csv(out / "tables" / "base_isn_dominance.csv")
    hum = s["human_subset"]["n_per_category"]
    assert [r[header.index("human_n")] for r in rows] == [str(hum[c]) for c in CATEGORIES] + [
        str(s["human_subset"]["n"])]


def test_no_bootstrap_is_said_not_left_out(tmp_path):
    base = analyze_model(dense_counts(0), IdentifyConfig(eps=0.1), name="base", n_boot=0, n_perm=0)
    write_report(tmp_path, build_summary({"base": base}), dpi=30)
    page = page_of(tmp_path)
    assert "no bootstrap was run (n_boot = 0)" in page and "no permutation test was run" in page


def test_a_section_without_any_selected_unit_gets_text_not_empty_figures(tmp_path):
    base = analyze_model(silenced(dense_counts(0)), IdentifyConfig(eps=0.1), name="base", n_boot=0, n_perm=0)
    summary = build_summary({"base": base})
    assert not any(summary["models"]["base"]["isn"]["per_category_count"].values())
    written = write_report(tmp_path, summary, analyses={"base": base}, dpi=30)
    names = {p.rsplit("/", 1)[-1] for p in written["figures"]}
    assert not names & {"overlap_isn.png", "instruction_overlap_isn.png", "instruction_matrix_base_isn.png",
                        "layers_isn.png", "generality_isn.png"}
    assert ("base: no neurons were selected for any category (every S(c) is empty; e.g. a threshold above "
            "every frequency), so the category overlap, layer distribution and generality figures are left "
            "out.") in page_of(tmp_path)


def drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_a_one_panel_figure_keeps_its_whole_title():
    fig = F.overlap_heatmaps({"base": np.eye(6).tolist()},
                             "Instruction-specific expert neurons (MoE): instruction-level overlap")
    r = drawn(fig)
    box = fig._suptitle.get_window_extent(r)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_legends_cover_no_bar_and_no_point():
    # Bars of equal height and a cloud of points that fill their panels: any legend inside covers data.
    sec = {"per_category_count": dict.fromkeys(CATEGORIES, 10), "unique": dict.fromkeys(CATEGORIES, 9),
           "unique_ratio": dict.fromkeys(CATEGORIES, 0.9), "breadth_histogram": {str(k): 10 for k in range(1, 7)},
           "general": 10, "general_share": 0.2}
    fig = F.generality_uniqueness({"base": sec, "tuned": sec}, "generality", units="neurons")
    r = drawn(fig)
    for ax in fig.axes:
        leg = ax.get_legend().get_window_extent(r)
        bars = [p.get_window_extent(r) for p in ax.patches if p.get_height() > 0]
        assert bars and not any(leg.overlaps(b) for b in bars), ax.get_title()
    n = 6 * 40
    rng = np.random.default_rng(0)
    v = {"tokens": rng.integers(1, 60, n).tolist(), "set_size": rng.integers(1, 60, n).tolist(),
         "category": [CATEGORIES[i % 6] for i in range(n)], "spearman": 0.0,
         "ties_kept": {"set_size": rng.integers(1, 60, n).tolist(), "spearman": 0.0}}
    fig = F.size_vs_length({"base": v}, "size vs length")
    r = drawn(fig)
    leg = fig.legends[0].get_window_extent(r)
    ax = fig.axes[0]
    pts = np.concatenate([ax.transData.transform(c.get_offsets()) for c in ax.collections])
    inside = (pts[:, 0] >= leg.x0) & (pts[:, 0] <= leg.x1) & (pts[:, 1] >= leg.y0) & (pts[:, 1] <= leg.y1)
    assert len(pts) == 2 * n and not inside.any()


def test_ablation_colour_bars_state_their_unit():
    m = np.full((6, 6), 0.1).tolist()
    fig = F.ablation_matrices(m, m, "ablation")
    labels = [ax.get_ylabel() for ax in fig.axes[3:]]  # the two colour bars
    assert labels == ["loss increase (nats per token)", "specific minus random (nats per token)"]


def test_demo_page_says_what_tiny_models_cannot_show(tmp_path):
    page = tmp_path / "pair" / "report" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html><head><title>t</title></head><body><h1>pair</h1><p>x</p></body></html>")
    doc = write_demo_report(tmp_path / "out", {"pair": {"models": {}}}, {"pair": page}, "demo").read_text()
    assert DEMO_CAVEAT in doc and doc.index(DEMO_CAVEAT) < doc.index('id="pair"')


def test_demo_page_names_reused_outputs_made_under_other_versions(tmp_path):
    page = tmp_path / "pair" / "report" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html><head><title>t</title></head><body><h1>pair</h1><p>x</p></body></html>")
    change = {"stage": "finetune", "output": "train/pair", "package": "flax", "old": "0.10.0", "new": "0.12.8"}
    doc = write_demo_report(tmp_path / "out", {"pair": {"environment_changes": [change]}}, {"pair": page},
                            "demo").read_text()
    assert "other versions than this demo's: pair: train/pair (flax 0.10.0 -&gt; 0.12.8)" in doc
    clean = write_demo_report(tmp_path / "clean", {"pair": {"environment_changes": []}}, {"pair": page},
                              "demo").read_text()
    assert "other versions" not in clean
    # recorded, but one that cannot change a number (`matters`) is not said to mix anything
    quiet = write_demo_report(tmp_path / "quiet", {"pair": {"environment_changes": [{**change, "matters": False}]}},
                              {"pair": page}, "demo").read_text()
    assert "other versions" not in quiet


def test_an_estimate_outside_its_interval_is_flagged_with_its_bias(tmp_path):
    # Noise units just below the consensus cut join the sets in resamples: the union grows and the
    # general share falls below its own interval (see test_analysis_uncertainty).
    from test_analysis_uncertainty import CFG, block_counts

    base = analyze_model(block_counts(per_cat=6, noise=1.0, seed=3), CFG, name="base", n_boot=40, n_perm=0)
    summary = build_summary({"base": base})
    b = summary["models"]["base"]["isn"]["bootstrap"]
    assert b["general_share"]["outside"] and not b["general"]["outside"]
    assert b["n_outside"]["general_share"] == 1
    write_report(tmp_path / "biased", summary, dpi=30)
    page = page_of(tmp_path / "biased")
    sb = b["general_share"]["bias"]
    assert f"share {100 * sb:+.2g} percentage points (outside its interval: the share falls when" in page
    assert (f"The estimate lies outside its own 95% interval for the general share (bias {100 * sb:+.2g} "
            "percentage points)") in page
    assert "not a range that covers its true value" in page
    _, rows = read_csv(tmp_path / "biased" / "tables" / "base_isn_generality.csv")
    d = dict((r[0], r[1]) for r in rows)
    assert d["general_share_outside"] == "True" and d["general_outside"] == "False"
    assert float(d["general_share_bias"]) == pytest.approx(sb, abs=1e-6)
    header, rows = read_csv(tmp_path / "biased" / "tables" / "base_isn_categories.csv")
    assert [float(r[header.index("size_bias")]) for r in rows] == pytest.approx(b["per_category_count"]["bias"],
                                                                                 abs=1e-5)
    # Identical instructions per category: every resample equals the estimate, nothing is flagged.
    clean = analyze_model(block_counts(), CFG, name="base", n_boot=10, n_perm=0)
    write_report(tmp_path / "clean", build_summary({"base": clean}), dpi=30)
    assert "The estimate lies outside its own" not in page_of(tmp_path / "clean")
    assert "(outside its interval:" not in page_of(tmp_path / "clean")
