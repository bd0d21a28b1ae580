"""scripts/seed_sweep.py's bookkeeping on synthetic summaries (no demo run): the rows it reads
from a pair's ablation block, the pass counts and ranges it tabulates, and the docs section it
rewrites in place."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import seed_sweep  # noqa: E402

from sparcom_jax.categories import CATEGORIES  # noqa: E402

C = len(CATEGORIES)


def _matrix(diag, off=9.0):
    """C x C with `diag` on the diagonal and `off` elsewhere (off-diagonal cells must not be read)."""
    return [[diag[i] if i == j else off for j in range(C)] for i in range(C)]


def _block(diag_excess, diag_p, sizes, mass=None):
    block = {"categories": list(CATEGORIES), "excess": _matrix(diag_excess), "p_value": _matrix(diag_p, 0.0),
             "set_sizes": dict(zip(CATEGORIES, sizes)), "mass_matched": None}
    if mass:
        block["mass_matched"] = {"excess": _matrix(mass[0]), "p_value": _matrix(mass[1], 0.0)}
    return block


def _summary(seed):
    """Seed-dependent synthetic experts (with the mass-matched control) and expert neurons."""
    ex = [0.1 * (seed + 1) ** 2, -0.2, 0.0, 0.3 - 0.1 * seed, 0.0, 0.05]  # (GEN: no set, its 0 not an excess)
    p = [0.05, 1.0, 0.5, 0.05 if seed < 2 else 0.1, None, 0.05]
    sizes = [2, 3, 4, 2 + seed, 0, 3]
    mass = ([e - 0.05 for e in ex], [0.05, 1.0, 0.9, 0.35, None, 0.1])
    return {"ablation": {"experts": _block(ex, p, sizes, mass),
                         "expert_neurons": _block([0.01] * C, [0.5] * C, [10] * C)}}


def _rows(seeds=(0, 1, 2)):
    return [r for s in seeds for r in seed_sweep.seed_rows(s, "mixtral", _summary(s))]


def test_rows_take_the_diagonal_of_each_control():
    rows = _rows((1,))
    exp = {r["category"]: r for r in rows if r["kind"] == "experts"}
    assert len(rows) == 2 * C
    cls, math = exp[CATEGORIES[0]], exp[CATEGORIES[3]]
    assert (cls["excess"], cls["p"], cls["set_size"]) == (pytest.approx(0.4), 0.05, 2)
    assert (math["excess"], math["mass_excess"], math["mass_p"]) == (pytest.approx(0.2), pytest.approx(0.15), 0.35)
    assert exp[CATEGORIES[4]]["set_size"] == 0
    neurons = [r for r in rows if r["kind"] == "expert_neurons"]
    assert all(r["mass_excess"] is None and r["excess"] == 0.01 for r in neurons)


def test_a_missing_ablation_block_is_named():
    with pytest.raises(SystemExit, match="ablation.expert_neurons"):
        seed_sweep.seed_rows(0, "mixtral", {"ablation": {"experts": _block([0.0] * C, [1.0] * C, [1] * C)}})


def test_pass_counts_medians_and_ranges_by_hand():
    s = seed_sweep.summarise(_rows(), alpha=0.05)
    cls = s[("mixtral", "experts", CATEGORIES[0])]
    # excess 0.1, 0.4, 0.9 (median 0.4, mean 0.47), every p = 0.05 (passes: p <= alpha); mass 0.05, 0.35, 0.85.
    assert (cls["seeds"], cls["random"]["n"], cls["random"]["passed"]) == (3, 3, 3)
    assert (cls["random"]["median"], cls["random"]["low"], cls["random"]["high"]) == pytest.approx((0.4, 0.1, 0.9))
    assert cls["mass-matched"]["passed"] == 3 and cls["mass-matched"]["low"] == pytest.approx(0.05)
    math = s[("mixtral", "experts", CATEGORIES[3])]
    # excess 0.3, 0.2, 0.1 with p 0.05, 0.05, 0.1: two of three pass; mass p 0.35: none.
    assert (math["random"]["passed"], math["mass-matched"]["passed"]) == (2, 0)
    assert (math["size"]["median"], math["size"]["low"], math["size"]["high"]) == (3, 2, 4)
    empty = s[("mixtral", "experts", CATEGORIES[4])]
    assert empty["random"] == {"n": 0, "passed": 0, "median": None, "low": None, "high": None}


def test_the_table_says_it_per_category():
    lines = seed_sweep.table(_rows(), alpha=0.05)
    by_cat = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines if ln.startswith("| ")}
    assert "| 3 of 3 | +0.400 [+0.100, +0.900] | 3 of 3 | +0.350 [+0.050, +0.850] |" in by_cat[CATEGORIES[0]]
    assert "| 3 (2-4) | 2 of 3 | +0.200 [+0.100, +0.300] | 0 of 3 |" in by_cat[CATEGORIES[3]]
    assert "no set" in by_cat[CATEGORIES[4]] and "| - |" in by_cat[CATEGORIES[4]]
    # expert neurons: a set, but no firing-mass-matched draws in these summaries ("where_warned" drew none)
    assert by_cat[CATEGORIES[1]].endswith("| 10 | 0 of 3 | +0.010 [+0.010, +0.010] | - | not drawn |")


def test_neuron_kinds_carry_their_firing_mass_control():
    """The Llama's neurons and the MoE's expert neurons report the firing-mass-matched control
    (`mass_matched` in their ablation block) as the experts report theirs: rows and columns."""
    mass = ([0.02 * i for i in range(C)], [0.05 if i % 2 else 0.5 for i in range(C)])
    summary = {"ablation": {"neurons": _block([0.1] * C, [0.05] * C, [7] * C, mass)}}
    rows = seed_sweep.seed_rows(0, "llama", summary)
    assert [r["mass_excess"] for r in rows] == pytest.approx(mass[0])
    assert [r["mass_p"] for r in rows] == mass[1]
    lines = seed_sweep.table(rows, alpha=0.05)
    assert "neurons: p ≤ 0.05 vs mass-matched" in lines[2]
    by_cat = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines if ln.startswith("| ")}
    assert by_cat[CATEGORIES[1]].endswith("| 1 of 1 | +0.020 [+0.020, +0.020] |")
    assert by_cat[CATEGORIES[2]].endswith("| 0 of 1 | +0.040 [+0.040, +0.040] |")


def _result(rows, seeds, **kw):
    return {"rows": rows, "alpha": 0.05, "seeds": list(seeds), "pairs": ["mixtral"], "fast": False,
            "overrides": [], "n_random": [19] * len(seeds), "code": "abc1234", "stamp": "Machine: test",
            "versions": "numpy x", "seconds": [60.0] * len(seeds), "seconds_per_seed": 60.0, **kw}


def test_the_docs_section_is_rewritten_in_place(tmp_path):
    page = tmp_path / "analysis.md"
    page.write_text("# A\n\nbefore\n\n<!-- seed_sweep:mixtral:start -->\nold table\n"
                    "<!-- seed_sweep:mixtral:end -->\n\nafter\n")
    seed_sweep.write_docs(_result(_rows((0,)), [0]), str(page))
    seed_sweep.write_docs(_result(_rows(), [0, 1, 2]), str(page))
    text = page.read_text()
    assert text.startswith("# A\n\nbefore\n\n<!-- seed_sweep:mixtral:start -->\n") and text.endswith(
        "<!-- seed_sweep:mixtral:end -->\n\nafter\n")
    assert text.count("seed_sweep:mixtral:start") == 1 and "old table" not in text and "1 seed (0)" not in text
    assert "3 seeds (0, 1, 2)" in text and "code abc1234" in text and "smallest p is 0.05" in text
    # The per-seed table: one column per seed, MATH's seed 2 with its size, both excesses and p.
    math = next(ln for ln in text.splitlines() if ln.startswith(f"| {CATEGORIES[3]} | 2:"))
    assert math.endswith("| 4: +0.10 (0.10); +0.05 (0.35) |")


def test_a_seed_sets_init_and_data_order_but_not_the_records():
    cfg = seed_sweep.sweep_config(3, ["mixtral"], fast=True)
    assert (cfg.seed, cfg.pretrain.seed, cfg.finetune.seed) == (3, 3, 3)
    assert (cfg.data.seed, cfg.data.split_seed) == (0, 0)
    assert [p.name for p in cfg.pairs] == ["mixtral"]
    with pytest.raises(SystemExit, match="not a demo pair"):
        seed_sweep.sweep_config(0, ["gpt"], fast=True)


def test_the_table_is_rewritten_from_a_saved_sweep(tmp_path):
    from sparcom_jax.fileio import write_json

    page, saved = tmp_path / "analysis.md", tmp_path / "sweep.json"
    page.write_text("# A\n")
    write_json(saved, {seed_sweep.SECTION: _result(_rows(), [0, 1, 2])})
    assert seed_sweep.main(["--from-json", str(saved), "--docs", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# A\n\n<!-- seed_sweep:mixtral:start -->\n") and "3 seeds (0, 1, 2)" in text


def test_sweeps_of_other_seeds_merge_into_one_table(tmp_path):
    from sparcom_jax.fileio import write_json

    page, a, b = tmp_path / "analysis.md", tmp_path / "a.json", tmp_path / "b.json"
    write_json(a, {seed_sweep.SECTION: _result(_rows((0, 1)), [0, 1])})
    write_json(b, {seed_sweep.SECTION: _result(_rows((2,)), [2], seconds=[90.0], code="def5678")})
    seed_sweep.main(["--from-json", str(a), str(b), "--docs", str(page)])
    merged = page.read_text()
    assert "3 seeds (0, 1, 2)" in merged and "code abc1234; def5678" in merged and "70 s per seed" in merged
    page.unlink()
    single = tmp_path / "one.json"
    write_json(single, {seed_sweep.SECTION: _result(_rows(), [0, 1, 2])})
    seed_sweep.main(["--from-json", str(single), "--docs", str(page)])
    # The merged table is the table of one sweep of the three seeds.
    assert merged.split("| category |", 1)[1] == page.read_text().split("| category |", 1)[1]


def test_sweeps_that_cannot_merge_are_refused_by_name(tmp_path):
    from sparcom_jax.fileio import write_json

    a, b, c = (tmp_path / f"{x}.json" for x in "abc")
    write_json(a, {seed_sweep.SECTION: _result(_rows((0,)), [0])})
    write_json(b, {seed_sweep.SECTION: _result(_rows((1,)), [1], fast=True)})
    write_json(c, {seed_sweep.SECTION: _result(_rows((0,)), [0])})
    with pytest.raises(SystemExit, match="differs from sweep 1 in fast"):
        seed_sweep.main(["--from-json", str(a), str(b), "--no-docs"])
    with pytest.raises(SystemExit, match="more than one sweep"):
        seed_sweep.main(["--from-json", str(a), str(c), "--no-docs"])
    with pytest.raises(SystemExit, match="no seed sweep read"):
        seed_sweep.main(["--from-json", str(tmp_path / "missing.json"), "--no-docs"])


def test_a_refused_seed_is_one_line_naming_it_and_the_finished_seeds(tmp_path, monkeypatch):
    from sparcom_jax.errors import StaleResultError

    def run_seed(seed, args):
        if seed == 1:
            raise StaleResultError("OUT/ablate/x.json: made with other inputs or settings (...); re-run with --overwrite")
        return [], seed_sweep.stat_rows(seed, "llama", _llama_pair(seed)), 19, 1.0

    monkeypatch.setattr(seed_sweep, "run_seed", run_seed)
    with pytest.raises(SystemExit) as e:
        seed_sweep.main(["--seed-list", "0,1", "--work", str(tmp_path), "--no-docs"])
    msg = str(e.value)
    assert msg.startswith("seed_sweep: seed 1: OUT/ablate/x.json") and "--overwrite" in msg
    assert str(tmp_path / "seed_sweep.json") in msg
    saved = seed_sweep.load_sweep(tmp_path / "seed_sweep.json")
    assert saved["seeds"] == [0] and saved["stats"] == _stats_rows((0,))  # the finished seed's statistics kept


def _llama_summary(seed):
    """Seed-dependent synthetic Llama neurons (no mass-matched control)."""
    ex = [-0.1, 0.12 + 0.01 * seed, 0.01, 0.04, 0.1, -0.02]
    p = [1.0, 0.05, 0.1 if seed else 0.05, 0.05, 0.05, 0.95]
    return {"ablation": {"neurons": _block(ex, p, [77 + seed] * C)}}


def test_the_llama_neurons_get_a_per_seed_table(tmp_path):
    rows = [r for s in (0, 1) for r in seed_sweep.seed_rows(s, "llama", _llama_summary(s))]
    page = tmp_path / "analysis.md"
    seed_sweep.write_docs(_result(rows, [0, 1], pairs=["llama"]), str(page))
    text = page.read_text()
    assert "Neurons per seed: set size: excess vs random (p)." in text
    assert "| category | seed 0 | seed 1 |" in text
    code = next(ln for ln in text.splitlines() if ln.startswith(f"| {CATEGORIES[1]} | 77:"))
    assert code == f"| {CATEGORIES[1]} | 77: +0.12 (0.05) | 78: +0.13 (0.05) |"  # no mass-matched cell
    qa = next(ln for ln in text.splitlines() if ln.startswith(f"| {CATEGORIES[2]} | 77:"))
    assert qa.endswith("| 78: +0.01 (0.10) |")


def test_a_sweep_of_both_pairs_names_the_pair_of_each_per_seed_table():
    rows = _rows((0,)) + seed_sweep.seed_rows(0, "llama", _llama_summary(0))
    text = seed_sweep.section(_result(rows, [0], pairs=["mixtral", "llama"]))
    assert "Experts (mixtral) per seed: set size: excess vs random (p); excess vs mass-matched (p)." in text
    assert "Neurons (llama) per seed: set size: excess vs random (p)." in text
    assert text.index("Experts (mixtral) per seed") < text.index("Neurons (llama) per seed")


# --- the identification, evaluation and comparison statistics across seeds ---


# Holm-adjusted per-category p-values of the between-groups and the length-matched tests (each list
# differs from the others and from the raw p-values, so a p read from the wrong block shows); 0.05
# exactly passes at alpha 0.05, 0.0501 does not.
BG_HOLM = [0.05, 0.03, 0.5, 0.0501, 0.03, 0.01]
LM_HOLM = [0.2, 0.05, 0.06, 0.3, 1.0, 0.04]


def _section_stats(seed, k, base=False):
    """One analysed section's statistics for seed `seed` (k shifts the section's numbers; `base`: the
    base model's, every per-category p-value list reversed, so reading the wrong model shows)."""
    d = 0.05 + 0.01 * seed + k + (0.3 if base else 0)
    pcd = {c: 0.01 * (i + 1) + 0.001 * seed for i, c in enumerate(CATEGORIES)}
    bgd = {c: v - 0.002 * (i + 1) for i, (c, v) in enumerate(pcd.items())}
    order = (lambda x: x[::-1]) if base else (lambda x: list(x))  # noqa: E731
    model = {"diagonal_dominance": d, "per_category_dominance": pcd,
             "bootstrap": {"diagonal_dominance": {"low": d - 0.02, "high": d + 0.02},
                           "per_category_dominance": {"low": [v - 0.015 for v in pcd.values()],
                                                      "high": [v + 0.01 for v in pcd.values()]}},
             "permutation": {"p_value": 0.005 if seed < 2 else 0.2, "per_category_p_holm": order([0.03, 0.2, 0.03, 0.5, 0.04, 0.06]),
                             "per_category_p_value": [0.001] * C},
             "length_matched": {"statistic": d, "null_mean": d / 4 * (1 + seed),
                                "p_value": 0.05 if seed == 1 else 0.01,
                                "per_category_statistic": [v + 0.003 for v in pcd.values()],
                                "per_category_p_holm": order(LM_HOLM), "per_category_p_value": [0.002] * C},
             "human_subset": {"diagonal_dominance": d / 2, "permutation": {"p_value": 0.1 * seed}},
             "between_groups": {"diagonal_dominance": d - 0.01, "per_category_dominance": bgd,
                                "permutation": {"p_value": 0.005, "per_category_p_holm": order(BG_HOLM),
                                                "per_category_p_value": [0.003] * C},
                                "bootstrap": {"diagonal_dominance": {"low": d - 0.03, "high": d},
                                              "per_category_dominance": {"low": [v - 0.02 for v in bgd.values()],
                                                                         "high": [v + 0.02 for v in bgd.values()]}}},
             "set_size_vs_length": {"ties_kept": {"spearman": -0.5 + 0.3 * seed}},
             "phases": {"union": {"explained": 0.9, "explained_p": 0.5 - 0.2 * seed}}}
    jac = {c: {"jaccard": 0.1 * (i + 1), "bootstrap": {"jaccard": {"low": 0.05 * i, "high": 0.1 * (i + 2)}},
               "contrast": {"size_before": 10 + i, "size_after": 9 + i + seed},
               "frequency_shift": {"delta": 0.002 * (seed - 1)}} for i, c in enumerate(CATEGORIES)}
    same = {c: {"jaccard": 0.2, "bootstrap": {"jaccard": {"low": 0.1, "high": 0.3}},
                "template_effect": {"jaccard": {"estimate": -0.1 * seed, "low": -0.1 * seed - 0.05,
                                                "high": -0.1 * seed + 0.05}}} for c in CATEGORIES}
    change = {"estimate": -0.02 + 0.01 * seed, "low": -0.03 + 0.01 * seed, "high": -0.01 + 0.01 * seed}
    return model, jac, same, change


def _precision(seed, k):
    """The precision check's Jaccard per category of one section, under the pipeline's own names of
    its variants (so a renamed variant fails here): bfloat16, and the float32-gate variant (its own
    numbers); 0.95 exactly keeps the claim, 0.949 does not."""
    from sparcom_jax.pipeline.stages import PRECISIONS

    bf16 = [1.0, 0.95, 0.949, 0.97 - 0.01 * seed, 0.9 + k, 0.99]
    variants = [name for name in PRECISIONS if name != "float32"]  # float32 is the reference
    assert variants == ["bfloat16", "bfloat16 with float32 gate and weights"]
    return {variants[0]: dict(zip(CATEGORIES, bf16)), variants[1]: dict(zip(CATEGORIES, [v - 0.005 for v in bf16]))}


def _pair_summary(seed, ablation, sections):
    """A pair summary: `ablation`, and per section the blocks the statistics read (tuned 'chat';
    the base model's own numbers beside it)."""
    s = {"categories": list(CATEGORIES), **ablation, "models": {"chat": {}, "base": {}},
         "comparison": {"before": "base", "after": "chat"}, "series": {},
         "controls": {"same_template": {"moves": {}}},
         "precision": {"reference": "chat (float32)", "note": "the study's counts are in float32"}}
    for k, sec in enumerate(sections):
        model, jac, same, change = _section_stats(seed, 0.1 * k)
        s["models"]["chat"][sec] = model
        s["models"]["base"][sec] = _section_stats(seed, 0.1 * k, base=True)[0]
        s["precision"].update({f"{sec} {variant}": jac for variant, jac in _precision(seed, 0.01 * k).items()})
        s["comparison"][sec] = jac
        s["series"][sec] = {"bootstrap": {"change": {"diagonal_dominance": change}}}
        s["controls"]["same_template"][sec] = same
        s["controls"]["same_template"]["moves"][sec] = {"diagonal_dominance": {"delta": 0.01 - 0.01 * seed}}
    return s


def _llama_pair(seed):
    return _pair_summary(seed, _llama_summary(seed), ["isn"])


def _stat(rows, stat, category="all", section="isn"):
    return next(r for r in rows if (r["stat"], r["category"], r["section"]) == (stat, category, section))


def test_stat_rows_read_each_statistic_of_the_tuned_model():
    rows = seed_sweep.stat_rows(1, "llama", _llama_pair(1))
    model, jac, same, change = _section_stats(1, 0.0)
    d = model["diagonal_dominance"]
    diag = _stat(rows, "diagonal_dominance")
    assert (diag["value"], diag["low"], diag["high"], diag["p"]) == pytest.approx((d, d - 0.02, d + 0.02, 0.005))
    assert _stat(rows, "length_matched")["value"] == pytest.approx(0.5)  # null mean d/4 * 2 of d
    math = _stat(rows, "per_category_dominance", CATEGORIES[4])
    assert (math["value"], math["p"]) == (pytest.approx(0.051), 0.04)  # the dict by name, Holm p by position
    assert math["low"] == pytest.approx(0.036)
    growth = _stat(rows, "contrast_growth", CATEGORIES[2])
    assert growth["value"] == pytest.approx((9 + 2 + 1) / (10 + 2) - 1)
    assert _stat(rows, "template_effect", CATEGORIES[0])["high"] == pytest.approx(-0.05)
    assert _stat(rows, "diagonal_change")["high"] == pytest.approx(0.0)
    assert _stat(rows, "same_template_change")["value"] == pytest.approx(0.0)
    bg = _stat(rows, "between_groups")
    assert (bg["value"], bg["low"], bg["high"]) == pytest.approx((d - 0.01, d - 0.03, d))
    hs = _stat(rows, "human_subset")
    assert (hs["value"], hs["low"], hs["p"]) == (pytest.approx(d / 2), None, pytest.approx(0.1))
    assert {r["seed"] for r in rows} == {1} and {r["pair"] for r in rows} == {"llama"}


def test_the_moe_reads_both_sections_and_no_routing_frequency_shift():
    pair = _pair_summary(0, _summary(0), ["ise", "expert_neurons"])
    rows = seed_sweep.stat_rows(0, "mixtral", pair)
    assert _stat(rows, "diagonal_dominance", section="expert_neurons")["value"] == pytest.approx(0.15)
    assert not [r for r in rows if r["section"] == "ise" and r["stat"] == "frequency_shift"]
    assert len([r for r in rows if r["section"] == "expert_neurons" and r["stat"] == "frequency_shift"]) == C


def test_a_statistic_a_run_did_not_compute_is_shown_missing_and_named():
    pair = _llama_pair(1)
    pair["models"]["chat"]["isn"]["length_matched"] = None  # e.g. no permutations
    del pair["controls"]["same_template"]["isn"]  # the same-template control off
    pair["comparison"]["isn"][CATEGORIES[2]]["contrast"] = {"size_before": 3}  # a field of it absent
    rows = seed_sweep.stat_rows(1, "llama", pair) + seed_sweep.stat_rows(0, "llama", _llama_pair(0))
    lm = _stat(rows, "length_matched")
    assert (lm["value"], lm["p"], lm["missing"]) == (None, None, "models.chat.isn.length_matched")
    effect = [r for r in rows if r["stat"] == "template_effect" and r["seed"] == 1]
    assert [r["category"] for r in effect] == list(CATEGORIES) and {r["value"] for r in effect} == {None}
    assert _stat(rows, "contrast_growth", CATEGORIES[2])["missing"] == "contrast_growth field 'size_after'"
    assert _stat(rows, "diagonal_dominance")["value"] is not None and "missing" not in _stat(rows, "diagonal_dominance")
    text = seed_sweep.stats_section(_result([], [1, 0], pairs=["llama"], stats=rows))
    assert "llama `isn` `length_matched` in seed 1 (no `models.chat.isn.length_matched`)" in text
    assert "`template_effect` in seed 1 (no `controls.same_template.isn`)" in text
    assert _line(text.splitlines(), "length_matched").endswith("| - | +0.250, p 0.01 | +0.250 [+0.250, +0.250] | 1 of 1 (p ≤ 0.05) |")


def test_a_summary_without_the_pairs_sections_is_refused_by_name():
    pair = _llama_pair(0)
    del pair["models"]["chat"]["isn"]
    with pytest.raises(SystemExit, match=r"seed 0, pair llama: summary.json has no models\.chat\.isn \(the tuned"):
        seed_sweep.stat_rows(0, "llama", pair)


def _stats_rows(seeds=(0, 1, 2)):
    return [r for s in seeds for r in seed_sweep.stat_rows(s, "llama", _llama_pair(s))]


def _line(lines, stat, category="all"):
    return next(ln for ln in lines if ln.startswith(f"| `{stat}` | {category} |"))


def test_the_statistics_table_gives_each_seed_the_spread_and_the_seeds_keeping_the_claim():
    lines = seed_sweep.stats_table(_stats_rows(), alpha=0.05)
    diag = _line(lines, "diagonal_dominance")
    # diagonals 0.05, 0.06, 0.07; permutation p 0.005, 0.005, 0.2: two of three keep p <= 0.05.
    assert diag.endswith("| +0.060 [+0.050, +0.070] | 2 of 3 (p ≤ 0.05) |")
    assert "| +0.050 [+0.030, +0.070], p 0.005 |" in diag and "+0.070 [+0.050, +0.090], p 0.2" in diag
    # Spearman -0.5, -0.2, +0.1: two below 0. The fall's intervals end at -0.01, 0.00, +0.01: one below 0.
    assert _line(lines, "length_spearman").endswith("| 2 of 3 (below 0) |")
    assert _line(lines, "length_matched").endswith("| 3 of 3 (p ≤ 0.05) |")  # seed 1's p = 0.05 exactly keeps it
    assert _line(lines, "diagonal_change").endswith("| 1 of 3 (CI below 0) |")
    # The template effect's intervals end at +0.05, -0.05, -0.15: two below 0; the Jaccard claims nothing.
    assert _line(lines, "template_effect", CATEGORIES[3]).endswith("| 2 of 3 (CI below 0) |")
    assert _line(lines, "jaccard", CATEGORIES[3]).endswith("| - |")
    # The absolute rule's CLS count 10 -> 9, 10, 11: one grows; phases' explained_p 0.5, 0.3, 0.1: none.
    assert _line(lines, "contrast_growth", CATEGORIES[0]).endswith("| -0.100 | +0.000 | +0.100 | +0.000 [-0.100, +0.100] | 1 of 3 (above 0) |")
    assert _line(lines, "phases").endswith("| 0 of 3 (p ≤ 0.05) |")
    # The human subset's p is 0 in seed 0, 0.1 and 0.2 after it.
    assert _line(lines, "human_subset").endswith("| 1 of 3 (p ≤ 0.05) |")


def test_a_seed_without_a_statistic_is_not_counted():
    rows = _stats_rows((0, 1))
    next(r for r in rows if r["seed"] == 1 and r["stat"] == "length_spearman")["value"] = None
    hs = next(r for r in rows if r["seed"] == 1 and r["stat"] == "human_subset")
    hs["value"], hs["p"] = None, 0.01  # a p without its value is not a seed with the statistic
    lines = seed_sweep.stats_table(rows, alpha=0.05)
    assert _line(lines, "length_spearman").endswith("| -0.500 | - | -0.500 [-0.500, -0.500] | 1 of 1 (below 0) |")
    assert _line(lines, "human_subset").endswith("| - | +0.025 [+0.025, +0.025] | 1 of 1 (p ≤ 0.05) |")


def _write_run(work, seed, pair):
    from sparcom_jax.fileio import write_json

    path = Path(work) / f"seed{seed}" / "report" / "summary.json"
    path.parent.mkdir(parents=True)
    write_json(path, {"pairs": {"llama": pair}})
    return path


def test_a_saved_sweep_gets_its_statistics_from_its_runs(tmp_path):
    from sparcom_jax.fileio import write_json

    work, saved, page, out = tmp_path / "work", tmp_path / "sweep.json", tmp_path / "analysis.md", tmp_path / "out.json"
    rows = [r for s in (0, 1) for r in seed_sweep.seed_rows(s, "llama", _llama_summary(s))]
    write_json(saved, {seed_sweep.SECTION: _result(rows, [0, 1], pairs=["llama"])})
    runs = [_write_run(work, s, _llama_pair(s)) for s in (0, 1)]
    before = [p.read_bytes() for p in runs]
    assert seed_sweep.main(["--from-json", str(saved), "--runs", str(work), "--docs", str(page), "--json", str(out)]) == 0
    text = page.read_text()
    assert "<!-- seed_sweep:llama:start -->" in text and "<!-- seed_sweep_stats:llama:start -->" in text
    assert _line(text.splitlines(), "diagonal_dominance").endswith("| 2 of 2 (p ≤ 0.05) |")
    assert seed_sweep.load_sweep(out)["stats"] == _stats_rows((0, 1))
    assert [p.read_bytes() for p in runs] == before  # the runs are only read


def test_a_run_that_is_not_the_sweeps_is_refused(tmp_path):
    from sparcom_jax.fileio import write_json

    work, saved = tmp_path / "work", tmp_path / "sweep.json"
    rows = [r for s in (0, 1) for r in seed_sweep.seed_rows(s, "llama", _llama_summary(s))]
    write_json(saved, {seed_sweep.SECTION: _result(rows, [0, 1], pairs=["llama"])})
    _write_run(work, 0, _llama_pair(0))
    _write_run(work, 1, _pair_summary(1, _llama_summary(2), ["isn"]))  # seed 2's causal check in seed1/
    with pytest.raises(SystemExit, match="seed1 is not this sweep's run of seed 1"):
        seed_sweep.main(["--from-json", str(saved), "--runs", str(work), "--no-docs"])
    with pytest.raises(SystemExit, match="seed2.report.summary.json: no summary read"):
        seed_sweep.stats_from_runs(_result(rows, [2], pairs=["llama"]), str(work))
    with pytest.raises(SystemExit, match="--runs reads the statistics of a saved sweep"):
        seed_sweep.main(["--runs", str(work), "--no-docs"])


def test_merged_sweeps_keep_every_seeds_statistics(tmp_path):
    from sparcom_jax.fileio import write_json

    page, a, b = tmp_path / "analysis.md", tmp_path / "a.json", tmp_path / "b.json"
    rows = lambda seeds: [r for s in seeds for r in seed_sweep.seed_rows(s, "llama", _llama_summary(s))]  # noqa: E731
    write_json(a, {seed_sweep.SECTION: _result(rows((0, 1)), [0, 1], pairs=["llama"], stats=_stats_rows((0, 1)))})
    write_json(b, {seed_sweep.SECTION: _result(rows((2,)), [2], pairs=["llama"], stats=_stats_rows((2,)))})
    seed_sweep.main(["--from-json", str(a), str(b), "--docs", str(page)])
    lines = page.read_text().splitlines()
    assert "| statistic | category | seed 0 | seed 1 | seed 2 | median [min, max] | seeds keeping the claim |" in lines
    assert _line(lines, "diagonal_dominance").endswith("| +0.060 [+0.050, +0.070] | 2 of 3 (p ≤ 0.05) |")


# --- precision and the per-category tests of the between-groups and length-matched diagonals ---


def test_the_per_category_tests_read_their_own_blocks_of_the_tuned_model():
    seed = 1
    rows = seed_sweep.stat_rows(seed, "llama", _llama_pair(seed))
    for i, c in enumerate(CATEGORIES):
        pcd = 0.01 * (i + 1) + 0.001 * seed  # the tuned model's per-category dominance (see _section_stats)
        bg = _stat(rows, "between_groups_per_category", c)
        assert bg["value"] == pytest.approx(pcd - 0.002 * (i + 1))
        assert (bg["low"], bg["high"]) == pytest.approx((bg["value"] - 0.02, bg["value"] + 0.02))
        assert bg["p"] == BG_HOLM[i]  # Holm-adjusted, not the raw p, not the base model's (reversed)
        lm = _stat(rows, "length_matched_per_category", c)
        assert (lm["value"], lm["low"], lm["high"], lm["p"]) == (pytest.approx(pcd + 0.003), None, None, LM_HOLM[i])
        assert _stat(rows, "per_category_dominance", c)["value"] == pytest.approx(pcd)  # unchanged beside them


def test_precision_is_each_sections_jaccard_per_variant():
    pair = _pair_summary(2, _summary(2), ["ise", "expert_neurons"])
    rows = seed_sweep.stat_rows(2, "mixtral", pair)
    for k, sec in enumerate(("ise", "expert_neurons")):
        want = _precision(2, 0.01 * k)
        for c in CATEGORIES:
            bf16, gate = _stat(rows, "precision_bfloat16", c, sec), _stat(rows, "precision_f32_gate", c, sec)
            assert (bf16["value"], gate["value"]) == (want["bfloat16"][c], want["bfloat16 with float32 gate and weights"][c])
            assert (bf16["low"], bf16["p"]) == (None, None)
    # the two sections differ in MATH (0.90 and 0.91): each row has its own section's
    assert _stat(rows, "precision_bfloat16", CATEGORIES[4], "expert_neurons")["value"] == pytest.approx(0.91)


def test_a_run_without_the_precision_check_shows_it_missing():
    pair = _llama_pair(0)
    pair["precision"] = None  # collect.precision_check off
    rows = seed_sweep.stat_rows(0, "llama", pair)
    missing = [r for r in rows if r["stat"] == "precision_bfloat16"]
    assert [r["category"] for r in missing] == list(CATEGORIES)
    assert {(r["value"], r["missing"]) for r in missing} == {(None, "precision")}
    text = seed_sweep.stats_section(_result([], [0], pairs=["llama"], stats=rows))
    assert "llama `isn` `precision_bfloat16` in seed 0 (no `precision`)" in text


def test_a_run_holding_both_pairs_gives_each_pair_its_own_statistics(tmp_path):
    from sparcom_jax.fileio import write_json

    work, saved = tmp_path / "work", tmp_path / "sweep.json"
    rows = seed_sweep.seed_rows(0, "llama", _llama_summary(0))
    write_json(saved, {seed_sweep.SECTION: _result(rows, [0], pairs=["llama"])})
    other = _pair_summary(3, _llama_summary(0), ["isn"])  # another pair's numbers (seed 3's) under isn
    for sec in other["models"]["chat"].values():
        sec["between_groups"]["permutation"]["per_category_p_holm"] = [0.9] * C
    path = Path(work) / "seed0" / "report" / "summary.json"
    path.parent.mkdir(parents=True)
    write_json(path, {"pairs": {"mixtral": other, "llama": _llama_pair(0)}})
    stats = seed_sweep.stats_from_runs(_result(rows, [0], pairs=["llama"]), str(work))["stats"]
    assert [_stat(stats, "between_groups_per_category", c)["p"] for c in CATEGORIES] == BG_HOLM
    assert [_stat(stats, "precision_bfloat16", c)["value"] for c in CATEGORIES] == list(_precision(0, 0)["bfloat16"].values())


def test_the_new_claims_count_p_and_jaccard_at_their_bounds():
    lines = seed_sweep.stats_table(_stats_rows(), alpha=0.05)
    # Holm p 0.05 exactly keeps p <= 0.05 in every seed; 0.0501 in none.
    assert _line(lines, "between_groups_per_category", CATEGORIES[0]).endswith("| 3 of 3 (p ≤ 0.05) |")
    assert _line(lines, "between_groups_per_category", CATEGORIES[3]).endswith("| 0 of 3 (p ≤ 0.05) |")
    assert _line(lines, "length_matched_per_category", CATEGORIES[1]).endswith("| 3 of 3 (p ≤ 0.05) |")
    assert _line(lines, "length_matched_per_category", CATEGORIES[2]).endswith("| 0 of 3 (p ≤ 0.05) |")
    # Jaccard 0.95 exactly keeps >= 0.95, 0.949 does not; GEN's 0.97, 0.96, 0.95 all do; the gate
    # variant's (0.005 lower) 0.945 for CODE does not.
    assert _line(lines, "precision_bfloat16", CATEGORIES[1]).endswith("| 3 of 3 (≥ 0.95) |")
    assert _line(lines, "precision_bfloat16", CATEGORIES[2]).endswith("| 0 of 3 (≥ 0.95) |")
    assert _line(lines, "precision_bfloat16", CATEGORIES[3]).endswith(
        "| +0.970 | +0.960 | +0.950 | +0.960 [+0.950, +0.970] | 3 of 3 (≥ 0.95) |")
    assert _line(lines, "precision_f32_gate", CATEGORIES[1]).endswith("| 0 of 3 (≥ 0.95) |")


def test_the_holm_tests_are_counted_with_what_chance_gives():
    lines = seed_sweep.stats_table(_stats_rows(), alpha=0.05)
    line = next(ln for ln in lines if ln.startswith("Per-category tests passing"))
    assert "(p ≤ 0.05, Holm-adjusted over a seed's 6 categories)" in line
    # Per seed: 3 of the main Holm p-values pass, 4 of BG_HOLM, 2 of LM_HOLM; three seeds of six
    # categories, so chance gives at most 0.05 x 18 = 0.9 tests and 0.05 x 3 = 0.15 seeds.
    for key, passed in (("per_category_dominance", 9), ("between_groups_per_category", 12),
                        ("length_matched_per_category", 6)):
        assert f"`{key}` {passed} of 18 tests [≤ 0.9], in 3 of 3 seeds [≤ 0.15]" in line
    rows = _stats_rows((0, 1))
    for r in rows:  # seed 1 without the between-groups test: not counted
        if r["seed"] == 1 and r["stat"] == "between_groups_per_category":
            r["value"] = None
    line = next(ln for ln in seed_sweep.stats_table(rows, alpha=0.05) if ln.startswith("Per-category tests passing"))
    assert "`between_groups_per_category` 4 of 6 tests [≤ 0.3], in 1 of 1 seeds [≤ 0.05]" in line
    assert "`per_category_dominance` 6 of 12 tests [≤ 0.6], in 2 of 2 seeds [≤ 0.1]" in line


def test_a_holm_statistic_no_seed_tested_is_left_out_of_the_count_and_none_gives_no_line():
    rows = [r for r in _stats_rows((0, 1)) if r["stat"] != "length_matched_per_category"]
    line = next(ln for ln in seed_sweep.stats_table(rows, alpha=0.05) if ln.startswith("Per-category tests passing"))
    assert "length_matched" not in line and "(p ≤ 0.05, Holm-adjusted over a seed's 6 categories)" in line
    assert "`per_category_dominance` 6 of 12 tests [≤ 0.6], in 2 of 2 seeds [≤ 0.1]" in line
    assert "`between_groups_per_category` 8 of 12 tests [≤ 0.6], in 2 of 2 seeds [≤ 0.1]" in line
    rows = [r for r in rows if r["stat"] not in seed_sweep.HOLM]
    assert seed_sweep.holm_lines(rows, 0.05) == []
    assert not any(ln.startswith("Per-category tests passing") for ln in seed_sweep.stats_table(rows, alpha=0.05))


# --------------------------------------------------------------------------- #
# --runs: edges of reading a saved sweep's runs (written against hand-made mutants of
# read_run / stats_from_runs / stats_table that the tests above let through)
# --------------------------------------------------------------------------- #

def _saved_llama_sweep(tmp_path, seeds=(0, 1), **kw):
    from sparcom_jax.fileio import write_json

    saved = tmp_path / "sweep.json"
    rows = [r for s in seeds for r in seed_sweep.seed_rows(s, "llama", _llama_summary(s))]
    write_json(saved, {seed_sweep.SECTION: _result(rows, list(seeds), pairs=["llama"], **kw)})
    return saved


def test_runs_that_cannot_be_read_are_refused_naming_the_summary(tmp_path):
    work = tmp_path / "work"
    saved = _saved_llama_sweep(tmp_path, seeds=(0,))
    path = _write_run(work, 0, _llama_pair(0))
    path.write_text('{"pairs": {"llama": ')  # (cut mid-write)
    with pytest.raises(SystemExit, match=r"--runs: .*seed0.report.summary\.json: no summary read \(JSONDecodeError"):
        seed_sweep.main(["--from-json", str(saved), "--runs", str(work), "--no-docs"])
    path.write_text('{"pairs": {"mixtral": {}}}')  # another pair's run
    with pytest.raises(SystemExit, match=r"summary\.json has no pair llama \(it has mixtral\)"):
        seed_sweep.main(["--from-json", str(saved), "--runs", str(work), "--no-docs"])
    for text in ('{"models": {}}', '{"pairs": {}}'):  # not a demo's summary; one of no pair
        path.write_text(text)
        with pytest.raises(SystemExit, match=r"summary\.json has no pair llama \(it has none\)$"):
            seed_sweep.main(["--from-json", str(saved), "--runs", str(work), "--no-docs"])


def test_the_statistics_caption_names_the_runs_and_their_commits_once(tmp_path):
    """The caption says where the statistics were read and at which commit(s), each named once
    (7 characters); a saved sweep's statistics of earlier runs are replaced, not added to."""
    work, page, out = tmp_path / "work", tmp_path / "analysis.md", tmp_path / "out.json"
    stale = [{**r, "value": 9.0} for r in _stats_rows((0,))]
    saved = _saved_llama_sweep(tmp_path, stats=stale)
    for s in (0, 1):
        pair = _llama_pair(s)
        pair["environment"] = {"sparcom_jax": {"commit": "0123456789abcdef", "dirty": False}}
        _write_run(work, s, pair)
    seed_sweep.main(["--from-json", str(saved), "--runs", str(work), "--docs", str(page), "--json", str(out)])
    text = page.read_text()
    assert f"read from each seed's report/summary.json ({work}/seed<s>, runs at 0123456); code abc1234." in text
    assert seed_sweep.load_sweep(out)["stats"] == _stats_rows((0, 1))


def test_a_value_or_interval_bound_of_exactly_0_keeps_no_sign_claim():
    def row(v):
        return {"value": v, "low": v, "high": v, "p": None}

    for claim in (">0", "<0", "ci>0", "ci<0"):
        assert seed_sweep.keeps(claim, row(0.0), 0.05) is False, claim
    assert seed_sweep.keeps(">0", row(1e-9), 0.05) and seed_sweep.keeps("<0", row(-1e-9), 0.05)
    assert seed_sweep.keeps("ci>0", row(1e-9), 0.05) and seed_sweep.keeps("ci<0", row(-1e-9), 0.05)


def test_a_seed_with_a_value_but_nothing_to_judge_its_claim_by_is_not_counted():
    rows = _stats_rows((0, 1))
    next(r for r in rows if r["seed"] == 1 and r["stat"] == "phases")["p"] = None  # (an explained share, no p)
    line = _line(seed_sweep.stats_table(rows, alpha=0.05), "phases")
    assert line.endswith("| +0.900, p 0.5 | +0.900 | +0.900 [+0.900, +0.900] | 0 of 1 (p ≤ 0.05) |")
