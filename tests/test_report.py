"""The report directory: summary.json, CSV tables, PNG figures, self-contained index.html."""

import base64
import csv
import json
import os
import re

import numpy as np
import pytest

from sparcom_jax.analysis import (
    IdentifyConfig, ablation_matrix, analyze_model, build_summary, compare_models, compare_series,
    identify,
)
from sparcom_jax.analysis.ablate import coverage_warnings
from sparcom_jax.categories import CATEGORIES, SHORT_NAMES
from sparcom_jax.report import atomic_write, export_sets, write_report
from sparcom_jax.report import io as rio
from sparcom_jax.stats.counts import Counts

N_PER, L, F, E, G = 3, 3, 12, 4, 5


def moe_counts(seed):
    """A small MoE: shared-expert neurons, routing and expert neurons; category c prefers units of c."""
    rng = np.random.default_rng(seed)
    n = 6 * N_PER
    t = rng.integers(8, 20, n)
    cats = [CATEGORIES[i // N_PER] for i in range(n)]
    shape_t = t[:, None, None]
    p = rng.random((n, L, F)) * 0.4
    er = rng.integers(0, 4, (n, L, E))
    for i in range(n):
        c = i // N_PER
        p[i, :, 2 * c:2 * c + 2] += 0.6
        er[i, :, c % E] += 10
    er = np.minimum(er, shape_t)
    ena = (rng.random((n, L, E, G)) * er[..., None]).astype(np.int32)
    return Counts(tokens=t, neuron_active=(p * shape_t).astype(np.int32), expert_routed=er,
                  expert_neuron_active=ena, categories=cats, meta={"model_path": f"/ckpt/{seed}"})


def fake_loss(sets):
    def loss_fn(mask):
        return {c: 2.0 + (0.0 if mask is None else 0.3 * (mask & sets[c]).sum() + 0.01 * mask.sum())
                for c in CATEGORIES}
    return loss_fn


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    cfg = IdentifyConfig(eps=0.1, eps_experts=0.2)
    kw = dict(n_boot=10, n_perm=19, instruction_level=("neuron_active", "expert_routed"))
    base = analyze_model(moe_counts(0), cfg, name="base", **kw)
    tuned = analyze_model(moe_counts(1), cfg, name="tuned", **kw)
    comp = compare_models(base, tuned)
    series = compare_series([("base", base), ("step1", tuned), ("tuned", tuned)])
    isn_sets = base["isn"].ident.sets()
    ise_sets = base["ise"].ident.sets()
    summary = build_summary(
        {"base": base, "tuned": tuned}, comparison=comp, series=series,
        ablation=ablation_matrix(isn_sets, fake_loss(isn_sets), n_random=2),
        ablation_experts=ablation_matrix(ise_sets, fake_loss(ise_sets), n_random=2, kind="experts"),
        model_paths={"base": "/ckpt/0", "tuned": "/ckpt/1"}, data={"path": "hexainst.jsonl", "n": 18},
        scope="prompt")
    out = tmp_path_factory.mktemp("report")
    written = write_report(out, summary, analyses={"base": base, "tuned": tuned}, dpi=40)
    return out, summary, written


def read_csv(path):
    with open(path) as f:
        rows = list(csv.reader(line for line in f if not line.startswith("#")))
    return rows[0], rows[1:]


def test_summary_schema(report):
    out, summary, _ = report
    with open(out / "summary.json") as f:
        loaded = json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert loaded == summary
    assert loaded["identification"] == IdentifyConfig(eps=0.1, eps_experts=0.2).to_dict()
    assert loaded["model_paths"]["tuned"] == "/ckpt/1" and loaded["scope"] == "prompt"
    assert loaded["data"]["n"] == 18
    for model in ("base", "tuned"):
        for sec in ("isn", "ise", "expert_neurons"):
            s = loaded["models"][model][sec]
            assert list(s["per_category_count"]) == list(CATEGORIES)
            assert list(s["per_layer"]) == list(CATEGORIES)
            assert all(len(v) == L for v in s["per_layer"].values())
            assert len(s["overlap_jaccard"]) == 6 and all(len(r) == 6 for r in s["overlap_jaccard"])
            assert isinstance(s["general"], int) and set(s["unique"]) == set(CATEGORIES)
        assert len(loaded["models"][model]["isn"]["instruction_overlap"]) == 6
        assert loaded["models"][model]["isn"]["permutation"]["n_perm"] == 19
        assert loaded["models"][model]["expert_neurons"]["instruction_overlap"] is None
    for sec in ("isn", "ise"):
        for c in CATEGORIES:
            e = loaded["comparison"][sec][c]
            assert e["retained"] + e["lost"] == e["size_before"]
            assert e["retained"] + e["gained"] == e["size_after"]
    ab = loaded["ablation"]
    for k in ("isn", "random", "ise", "ise_random"):
        assert np.asarray(ab[k], dtype=float).shape == (6, 6)
    assert loaded["series"]["names"] == ["base", "step1", "tuned"]


def test_files_and_html_embed_every_figure(report):
    out, summary, written = report
    figs = sorted(os.listdir(out / "figures"))
    expected = {"overlap_isn.png", "instruction_overlap_isn.png", "instruction_matrix_base_isn.png",
                "instruction_matrix_tuned_isn.png", "layers_isn.png", "generality_isn.png",
                "comparison_isn.png", "series_isn.png", "overlap_ise.png", "layers_ise.png",
                "expert_frequency_base.png", "expert_frequency_tuned.png", "expert_neurons_base.png",
                "ablation_neurons.png", "ablation_experts.png", "overlap_expert_neurons.png"}
    assert expected <= set(figs)
    assert "instruction_matrix_base_expert_neurons.png" not in figs  # instruction level skipped there
    html = (out / "index.html").read_text()
    for name in figs:
        png = (out / "figures" / name).read_bytes()
        assert png.startswith(b"\x89PNG")
        assert base64.b64encode(png).decode() in html, name
    # Self-contained: every image is a data URI, nothing is fetched.
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == len(figs) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=" not in html
    assert html.count("<figcaption>") == len(figs)
    assert sorted(os.path.basename(p) for p in written["figures"]) == figs
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]
    assert leftovers == []


def test_csv_tables_match_summary(report):
    out, summary, _ = report
    header, rows = read_csv(out / "tables" / "comparison_isn.csv")
    assert header[:7] == ["category", "size_before", "size_after", "retained", "gained", "lost", "jaccard"]
    assert [r[0] for r in rows] == list(CATEGORIES)
    for r in rows:
        e = summary["comparison"]["isn"][r[0]]
        assert [int(x) for x in r[1:6]] == [e[k] for k in ("size_before", "size_after", "retained",
                                                            "gained", "lost")]
    header, rows = read_csv(out / "tables" / "ablation_neurons_isn.csv")
    assert np.allclose(np.array([r[1:] for r in rows], float), summary["ablation"]["isn"], atol=1e-5)
    header, rows = read_csv(out / "tables" / "base_isn_per_layer.csv")
    assert len(rows) == L
    assert [int(r[1]) for r in rows] == summary["models"]["base"]["isn"]["per_layer"]["classification"]
    with open(out / "tables" / "base_isn_categories.csv") as f:
        assert f.readline().startswith("# identification: rule=top eps=0.1")


def test_export_sets_hand_case(tmp_path):
    # CLS fires units (0,1),(1,3); CODE fires (0,1),(1,0); the rest fire nothing.
    na = np.zeros((6, 2, 4), np.int32)
    na[0, 0, 1] = na[0, 1, 3] = 10
    na[1, 0, 1] = na[1, 1, 0] = 5
    counts = Counts(tokens=np.full(6, 10), neuron_active=na, categories=list(CATEGORIES))
    ident = identify(counts, "neuron_active", IdentifyConfig(eps=0.25))
    csv_path, json_path = export_sets(tmp_path, ident, prefix="m_")
    header, rows = read_csv(csv_path)
    assert header == ["category", "layer", "index", "frequency", "categories", "unique"]
    assert rows == [
        ["classification", "0", "1", "1", "CLS;CODE", "0"],
        ["classification", "1", "3", "1", "CLS", "1"],
        ["code", "0", "1", "0.5", "CLS;CODE", "0"],
        ["code", "1", "0", "0.5", "CODE", "1"],
    ]
    d = json.loads(open(json_path).read())
    assert d["identification"]["eps"] == 0.25 and d["units"] == ["layer", "neuron"]
    assert d["sets"]["code"][1] == {"layer": 1, "index": 0, "frequency": 0.5,
                                    "categories": ["code"], "unique": True}
    assert d["sets"]["math"] == []


def test_export_expert_neuron_sets_name_the_expert_file_and_rule(tmp_path):
    # MATH's one unit: layer 1, expert 2, neuron 3 of a [2, 3, 4] grid; the other categories fire nothing.
    ena = np.zeros((6, 2, 3, 4), np.int32)
    ena[4, 1, 2, 3] = 6
    er = np.zeros((6, 2, 3), np.int32)
    er[4, 1, 2] = 8
    counts = Counts(tokens=np.full(6, 10), expert_routed=er, expert_neuron_active=ena, categories=list(CATEGORIES))
    ident = identify(counts, "expert_neuron_active", IdentifyConfig(eps=0.25))
    csv_path, json_path = export_sets(tmp_path, ident, prefix="m_")
    assert sorted(os.listdir(tmp_path)) == ["m_expert_neurons.csv", "m_expert_neurons.json"]
    lines = open(csv_path).read().splitlines()
    assert lines[0] == "# expert_neurons (expert_neuron_active); index = neuron; 0-based"
    assert lines[1].startswith("# identification: rule=top eps=0.25")
    header, rows = read_csv(csv_path)
    assert header == ["category", "layer", "expert", "index", "frequency", "categories", "unique"]
    assert [r[:4] + r[5:] for r in rows] == [["math", "1", "2", "3", "MATH", "1"]]
    d = json.loads(open(json_path).read())
    assert (d["section"], d["field"], d["units"], d["unit_shape"]) == (
        "expert_neurons", "expert_neuron_active", ["layer", "expert", "neuron"], [2, 3, 4])
    assert [(u["layer"], u["expert"], u["index"]) for u in d["sets"]["math"]] == [(1, 2, 3)]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    atomic_write(p, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rio.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(p, "new")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_ablation_without_random_controls_says_it_has_none(tmp_path):
    # n_random=0: the page must not describe draws it never made ("mean of 0 draws", "steps of 1")
    # and must say the losses cannot be set against removing as many other units.
    base = analyze_model(moe_counts(0), IdentifyConfig(eps=0.1, eps_experts=0.2), name="base", n_boot=0, n_perm=0)
    sets = base["isn"].ident.sets()
    summary = build_summary({"base": base}, ablation=ablation_matrix(sets, fake_loss(sets), n_random=0),
                            scope="prompt")
    write_report(tmp_path, summary, analyses={"base": base}, dpi=30)
    page = (tmp_path / "index.html").read_text()
    assert "No random control sets were drawn (ablation.n_random=0)" in page
    assert "0 draws" not in page and "steps of" not in page


def test_series_intervals_in_summary_tables_and_page(report):
    """series.<section>.bootstrap: per-checkpoint intervals and the first-to-last change; the last
    checkpoint's Jaccard with the first has the paired interval of the base/tuned comparison, the
    tables and the page carry the same numbers."""
    out, summary, _ = report
    ser, comp = summary["series"]["isn"], summary["comparison"]["isn"]
    b = ser["bootstrap"]
    assert b["paired"] and b["n_boot"] == 10
    for c in CATEGORIES:
        last = {k: b["per_checkpoint"]["vs_base_jaccard"][k][c][-1] for k in ("low", "high")}
        assert last == pytest.approx({k: comp[c]["bootstrap"]["jaccard"][k] for k in ("low", "high")})
        size = ser["per_category_count"][c]
        assert b["change"]["per_category_count"]["estimate"][c] == size[-1] - size[0]
        assert len(b["per_checkpoint"]["per_category_count"]["low"][c]) == 3
    # step1 and tuned are one analysis: every replicate's change between them is 0, so their intervals agree.
    assert b["per_checkpoint"]["general_share"]["low"][1] == b["per_checkpoint"]["general_share"]["low"][2]
    header, rows = read_csv(out / "tables" / "series_isn_change.csv")
    row = next(r for r in rows if r[:2] == ["per_category_count", "math"])
    e = b["change"]["per_category_count"]
    assert [float(x) for x in row[2:5]] == pytest.approx([e[k]["math"] for k in ("estimate", "low", "high")])
    row = next(r for r in rows if r[0] == "diagonal_dominance")
    assert float(row[3]) == pytest.approx(b["change"]["diagonal_dominance"]["low"], abs=1e-6)
    header, rows = read_csv(out / "tables" / "series_isn.csv")
    row = rows[2 * len(CATEGORIES) + CATEGORIES.index("code")]
    high = comp["code"]["bootstrap"]["jaccard"]["high"]
    assert float(row[header.index("jaccard_vs_first_high")]) == pytest.approx(high)
    page = (out / "index.html").read_text()
    assert "Change from base to tuned, with 95% paired bootstrap intervals over 10 resamples" in page
    said = page[page.index("Change from base to tuned"):].split("; unique ratio")[0]
    for c in CATEGORIES:
        lo, hi = e["low"][c], e["high"][c]
        assert f"{SHORT_NAMES[c]} {e['estimate'][c]:+.4g} [{lo:+.4g}, {hi:+.4g}]" in said
    assert any(e["low"][c] < e["high"][c] for c in CATEGORIES)  # an interval whose order the text shows


def test_phase_table_carries_the_layer_order_p(report):
    out, summary, _ = report
    header, rows = read_csv(out / "tables" / "base_isn_phases.csv")
    ph = summary["models"]["base"]["isn"]["phases"]
    got = {r[0]: r[header.index("explained_p")] for r in rows}
    assert {k: None if v == "" else float(v) for k, v in got.items()} == pytest.approx(
        {k: v["explained_p"] for k, v in ph.items()})
    tested = [v["explained_p"] for v in ph.values() if v["explained_p"] is not None]  # None: a flat profile
    assert tested and all(abs(20 * p - round(20 * p)) < 1e-9 for p in tested)  # (1 + k) / (1 + 19 orders)


def test_series_figure_shades_the_paired_intervals(report):
    from sparcom_jax.report import figures as F

    _, summary, _ = report
    t = summary["series"]["isn"]
    fig = F.series_trends(summary["series"]["names"], t, "series")
    axes = fig.axes
    for ax, key in ((axes[4], "general_share"), (axes[5], "diagonal_dominance")):
        (band,) = ax.collections
        y = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
        per = t["bootstrap"]["per_checkpoint"][key]
        assert y.min() == pytest.approx(min(per["low"])) and y.max() == pytest.approx(max(per["high"]))
    no_boot = F.series_trends(summary["series"]["names"], {**t, "bootstrap": None}, "series")
    assert not no_boot.axes[4].collections


def test_a_figure_is_drawn_once_into_the_png_savefig_writes(monkeypatch):
    """savefig drew a laid-out figure twice (layout, then pixels); every report figure paid it."""
    import io

    from sparcom_jax.report import figures as F

    m = np.arange(36.0).reshape(6, 6) / 36
    buf = io.BytesIO()
    # Two of the same figure: matplotlib lays out a figure drawn before a little differently.
    F.overlap_heatmaps({"a": m, "b": m.T}, "a title").savefig(buf, format="png", dpi=40)
    fig = F.overlap_heatmaps({"a": m, "b": m.T}, "a title")
    draws = []
    draw = fig.draw
    monkeypatch.setattr(fig, "draw", lambda renderer: draws.append(renderer) or draw(renderer))
    assert F.to_png(fig, dpi=40) == buf.getvalue()
    assert len(draws) == 1 and fig.dpi == 100  # the dpi it is shown at (a notebook) is kept


def test_the_page_prints_the_matching_warnings(tmp_path):
    # A set whose units all fire more often than any other unit cannot be matched: the
    # page must say so beside the table, not only the JSON.
    base = analyze_model(moe_counts(0), IdentifyConfig(eps=0.1, eps_experts=0.2), name="base", n_boot=0, n_perm=0)
    every = base["isn"].ident.sets()
    sets = {"code": every["code"]}
    ablation = ablation_matrix(sets, fake_loss(every), n_random=1, frequency=np.where(sets["code"], 1.0, 0.1))
    (line,) = ablation.matching_warnings()
    assert line.startswith("code: its matched random neurons fire less often than its set (0.1 against 1")
    # Two categories whose loss rests on few records: the log puts them on one line, the
    # page keeps one warning per category.
    ablation.coverage = {"code": {"records": 8, "scored_records": 2, "response_tokens": 9},
                         "math": {"records": 3, "scored_records": 3, "response_tokens": 12}}
    thin = coverage_warnings(ablation.coverage)
    assert [w.split(":")[0] for w in thin] == ["code", "math"]
    write_report(tmp_path, build_summary({"base": base}, ablation=ablation, scope="prompt"),
                 analyses={"base": base}, dpi=30)
    page = (tmp_path / "index.html").read_text()
    for w in [line, *thin]:
        assert f"Warning: {w}." in page, w
