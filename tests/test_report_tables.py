"""The CSV tables column by column: each cell is the summary figure its header names.

Hand-built summaries give every figure its own value (category i of a figure with base b
holds b + i), so a cell taken from the wrong figure, category, layer or bootstrap part fails.
"""

import pytest

from sparcom_jax.categories import CATEGORIES, SHORT_NAMES
from sparcom_jax.report import tables as T

L = 2


def per_cat(base):
    return {c: base + i for i, c in enumerate(CATEGORIES)}


def boot_entry(base):
    """A per-category bootstrap entry whose parts differ: low b+i, high b+10+i, bias b+20+i."""
    return {"low": [base + i for i in range(6)], "high": [base + 10 + i for i in range(6)],
            "bias": [base + 20 + i for i in range(6)], "outside": [i == 2 for i in range(6)]}


def scalar_boot(base):
    return {"low": base, "high": base + 1, "bias": base + 2, "outside": True}


def matrix(base):
    return [[base + 10 * i + j for j in range(6)] for i in range(6)]


def section():
    return {
        "n_per_category": per_cat(100), "per_category_count": per_cat(200), "unique": per_cat(300),
        "unique_ratio": per_cat(400), "mean_instruction_set_size": per_cat(500), "mean_frequency": per_cat(600),
        "overlap_jaccard": matrix(1000), "overlap_coefficient": None, "instruction_overlap": None,
        "per_layer": {c: [10 * i + j for j in range(L)] for i, c in enumerate(CATEGORIES)},
        "per_layer_share": {c: [3000 + 10 * i + j for j in range(L)] for i, c in enumerate(CATEGORIES)},
        "union_per_layer": [1000 + j for j in range(L)], "general_per_layer": [2000 + j for j in range(L)],
        "general": 7, "union": 8, "general_share": 0.25, "diagonal_dominance": 0.5,
        "breadth_histogram": {"1": 5, "2": 3},
        "permutation": {"p_value": 0.03, "n_perm": 99, "unit": "record", "per_category_p_value": [0.1 + i for i in range(6)],
                        "per_category_p_holm": [0.2 + i for i in range(6)]},
        "bootstrap": {"n_boot": 50, "ci": 0.9, "unit": "group",
                      "per_category_count": boot_entry(210), "unique": boot_entry(310),
                      "per_category_dominance": boot_entry(710),
                      "general": scalar_boot(40), "general_share": scalar_boot(50), "diagonal_dominance": scalar_boot(60),
                      "overlap_jaccard": {"low": matrix(1100), "high": matrix(1200), "bias": matrix(1300),
                                          "outside": matrix(1400)}},
        "per_category_dominance": per_cat(700),
        "human_subset": {"per_category_dominance": per_cat(800), "n_per_category": per_cat(850), "n": 77,
                         "diagonal_dominance": 0.6, "permutation": {"p_value": 0.04,
                                                                    "per_category_p_value": [0.3 + i for i in range(6)]}},
        "between_groups": {"per_category_dominance": per_cat(900), "within_group_pairs": per_cat(950),
                           "diagonal_dominance": 0.7,
                           "permutation": {"p_value": 0.05, "per_category_p_value": [0.4 + i for i in range(6)]},
                           "bootstrap": {"per_category_dominance": boot_entry(960), "diagonal_dominance": scalar_boot(70)}},
        "length_matched": {"p_value": 0.06, "null_mean": 0.45, "per_category_p_value": [0.5 + i for i in range(6)]},
        "contrast": {"per_category_count": per_cat(1500), "mean_instruction_set_size": per_cat(1600),
                     "unique": per_cat(1700)},
        "phases": {"all": {"boundaries": [1, 2], "early": {"mean": 0.1}, "middle": {"mean": 0.2}, "late": None,
                           "explained": 0.8, "early_dominant": False, "explained_p": 0.07}},
    }


def tables(s):
    return {t.name: [dict(zip(t.header, r)) for r in t.rows] for t in T.model_tables("m/x", "isn", s)}


def test_category_table_cells_are_their_figures():
    t = tables(section())["m_x_isn_categories"]
    for i, c in enumerate(CATEGORIES):
        assert t[i] == {"category": c, "short": SHORT_NAMES[c], "n_instructions": 100 + i, "size": 200 + i,
                        "size_low": 210 + i, "size_high": 220 + i, "unique": 300 + i, "unique_low": 310 + i,
                        "unique_high": 320 + i, "unique_ratio": 400 + i, "mean_instruction_set_size": 500 + i,
                        "mean_frequency": 600 + i, "size_bias": 230 + i, "size_outside": i == 2,
                        "unique_bias": 330 + i, "unique_outside": i == 2}


def test_matrix_tables_per_layer_generality_contrast_and_phases():
    s = section()
    ts = {t.name: t for t in T.model_tables("m", "isn", s)}
    for part, base in (("low", 1100), ("high", 1200), ("bias", 1300), ("outside", 1400)):
        assert [r[1:] for r in ts[f"m_isn_overlap_jaccard_{part}"].rows] == matrix(base)
    assert "m_isn_overlap_coefficient" not in ts
    layers = [dict(zip(ts["m_isn_per_layer"].header, r)) for r in ts["m_isn_per_layer"].rows]
    assert layers[1] == {"layer": 1, **{f"count_{SHORT_NAMES[c]}": 10 * i + 1 for i, c in enumerate(CATEGORIES)},
                         "union": 1001, "general": 2001,
                         **{f"share_{SHORT_NAMES[c]}": 3001 + 10 * i for i, c in enumerate(CATEGORIES)}}
    gen = dict(ts["m_isn_generality"].rows)
    assert gen == {"general": 7, "union": 8, "general_share": 0.25, "diagonal_dominance": 0.5,
                   "permutation_p_value": 0.03, "permutation_n": 99,
                   **{f"{k}_{p}": v for k, b in (("general", 40), ("general_share", 50), ("diagonal_dominance", 60))
                      for p, v in (("low", b), ("high", b + 1), ("bias", b + 2), ("outside", True))},
                   "bootstrap_n": 50, "bootstrap_ci": 0.9, "bootstrap_unit": "group", "permutation_unit": "record",
                   "breadth_1": 5, "breadth_2": 3}
    con = [dict(zip(ts["m_isn_contrast"].header, r)) for r in ts["m_isn_contrast"].rows]
    assert con[3] == {"category": CATEGORIES[3], "size": 203, "contrast_size": 1503, "mean_instruction_set_size": 503,
                      "contrast_mean_instruction_set_size": 1603, "contrast_unique": 1703}
    assert ts["m_isn_phases"].rows == [["all", 1, 2, 0.1, 0.2, None, 0.8, False, 0.07]]


def test_dominance_rows_carry_holm_length_matched_human_and_group_figures():
    t = tables(section())["m_x_isn_dominance"]
    for i, c in enumerate(CATEGORIES):
        assert t[i] == {
            "category": c, "dominance": 700 + i, "low": 710 + i, "high": 720 + i, "permutation_p": 0.1 + i,
            "human_dominance": 800 + i, "human_permutation_p": 0.3 + i, "human_n": 850 + i, "bias": 730 + i,
            "outside": i == 2, "between_groups_dominance": 900 + i, "between_groups_permutation_p": 0.4 + i,
            "within_group_pairs": 950 + i, "between_groups_low": 960 + i, "between_groups_high": 970 + i,
            "between_groups_bias": 980 + i, "between_groups_outside": i == 2, "permutation_p_holm": 0.2 + i,
            "length_matched_permutation_p": 0.5 + i, "length_matched_null_mean": None}
    assert t[6] == {
        "category": "overall", "dominance": 0.5, "low": 60, "high": 61, "permutation_p": 0.03,
        "human_dominance": 0.6, "human_permutation_p": 0.04, "human_n": 77, "bias": 62, "outside": True,
        "between_groups_dominance": 0.7, "between_groups_permutation_p": 0.05,
        "within_group_pairs": sum(950 + i for i in range(6)), "between_groups_low": 70, "between_groups_high": 71,
        "between_groups_bias": 72, "between_groups_outside": True, "permutation_p_holm": None,
        "length_matched_permutation_p": 0.06, "length_matched_null_mean": 0.45}


def test_length_and_top_instruction_rows():
    v = {"per_category": {c: {"n": 1 + i, "mean_tokens": 10 + i, "mean_set_size": 20 + i, "spearman": 0.1 * i}
                          for i, c in enumerate(CATEGORIES)},
         "spearman": 0.9, "ties_kept": {"per_category": {c: {"mean_set_size": 30 + i, "spearman": 0.2 * i}
                                                          for i, c in enumerate(CATEGORIES)}, "spearman": 0.8},
         "category": ["code", "math"], "tokens": [5, 9], "set_size": [3, 4]}
    rows = T.length_rows(v)
    assert rows[1] == ["code", 2, 11, 21, 0.1, 31, 0.2]
    assert rows[-1] == ["all", 21, None, None, 0.9, None, 0.8]
    ts = {t.name: t for t in T.model_tables("m", "isn", {**section(), "set_size_vs_length": v})}
    assert ts["m_isn_set_size_vs_length_instructions"].rows == [[0, "code", 5, 3], [1, "math", 9, 4]]
    top = {"math": [{"layer": 3, "expert": 1, "neuron": 7, "category_frequency": 0.9,
                     "instructions": [{"id": "a", "category": "math", "frequency": 0.8, "tokens": 12},
                                      {"id": "b", "category": "code", "frequency": 0.6, "tokens": 15}]}]}
    assert T.top_instruction_rows(top) == [["math", "L3/E1/N7", 0.9, 1, "a", "math", 0.8, 12],
                                           ["math", "L3/E1/N7", 0.9, 2, "b", "code", 0.6, 15]]


def comparison():
    keys = ("size_before", "size_after", "retained", "gained", "lost", "jaccard")
    return {c: {**{k: 10 * n + i for n, k in enumerate(keys)},
                "frequency_shift": {"mean_before": 0.1, "mean_after": 0.2, "delta": 0.1, "per_layer_delta": [1, 2]},
                "per_layer": {k: [100 * n + i, 100 * n + i + 50] for n, k in enumerate(keys)},
                "bootstrap": {k: {"low": 1000 + n, "high": 2000 + n}
                              for n, k in enumerate(("retained", "gained", "lost", "jaccard"))}}
            for i, c in enumerate(CATEGORIES)}


def test_comparison_tables_carry_paired_intervals_and_per_layer_rows():
    main, per_layer = T.comparison_tables("isn", comparison(), prefix="control_x")
    assert main.name == "control_x_isn" and per_layer.name == "control_x_isn_per_layer"
    row = dict(zip(main.header, main.rows[1]))
    assert row["mean_p_before"] == 0.1 and row["mean_p_after"] == 0.2
    assert [row[f"{k}_{b}"] for k in ("retained", "gained", "lost", "jaccard") for b in ("low", "high")] == \
        [1000, 2000, 1001, 2001, 1002, 2002, 1003, 2003]
    assert per_layer.rows[2:4] == [["code", 0, 1, 101, 201, 301, 401, 501, 1], ["code", 1, 51, 151, 251, 351, 451, 551, 2]]


def test_ablation_tables_own_category_figures_and_matched_controls():
    d = {"isn": matrix(0), "random": matrix(100), "excess": matrix(200), "excess_std": matrix(300),
         "random_ge_fraction": matrix(400), "p_value": matrix(500), "baseline": per_cat(10), "set_sizes": per_cat(20),
         "dropped_mass": per_cat(30), "set_frequency": per_cat(40),
         # [draw, category], one draw of code missing: the mean is over the draws that exist
         "random_dropped_mass": [[None if r == 0 and a == 1 else 2.0 * r + a for a in range(6)] for r in range(6)],
         "closest_frequency": per_cat(50), "above_others": per_cat(60),
         "in_set": [[3.0 * a for a in range(6)] for _ in range(2)],
         "random_frequency": [[0.25 + a + 2 * r for a in range(6)] for r in range(2)],
         "coverage": {c: {"records": 60 + a, "scored_records": 70 + a, "response_tokens": 80 + a}
                      for a, c in enumerate(CATEGORIES)}}
    ts = {t.name: t for t in T.ablation_tables("neurons", d)}
    assert [r[1:] for r in ts["ablation_neurons_p_value"].rows] == matrix(500)
    assert ts["ablation_neurons_p_value"].header[0] == T.ABLATION_CORNER
    rows = [dict(zip(T.ABLATION_HEADER, r)) for r in ts["ablation_neurons_baseline"].rows]
    assert rows[1] == {"category": "code", "baseline_loss": 11, "set_size": 21, "excess_own": 211,
                       "excess_own_std": 311, "random_ge_fraction_own": 411, "dropped_mass": 31,
                       "random_dropped_mass_mean": (3 + 5 + 7 + 9 + 11) / 5, "in_set_mean": 3.0,
                       "p_own": 511, "set_frequency": 41, "random_frequency_mean": 2.25, "closest_frequency": 51,
                       "above_others": 61,
                       "held_out_records": 61, "scored_records": 71, "response_tokens": 81}


def test_series_precision_and_names_in_all_tables():
    t = {"per_category_count": per_cat_lists(0), "unique": per_cat_lists(10), "unique_ratio": per_cat_lists(20),
         "vs_base": {"jaccard": per_cat_lists(30)},
         "vs_previous": {k: per_cat_lists(40 + 10 * n) for n, k in enumerate(("jaccard", "retained", "gained", "lost"))},
         "general": [1, 2], "union": [3, 4], "general_share": [5, 6], "diagonal_dominance": [7, 8]}
    summary = {"models": {}, "series": {"names": ["a", "b"], "isn": t},
               "controls": {"same template!": {"isn": comparison()}},
               "ablation": {"expert_neurons": {"isn": matrix(0), "baseline": per_cat(0), "set_sizes": per_cat(0)}},
               "precision": {"note": "text", "bf16": per_cat(0)}}
    ts = {x.name: x for x in T.all_tables(summary)}
    assert {"control_same_template_isn", "ablation_expert_neurons_isn", "precision"} <= set(ts)
    # no bootstrap: empty bounds; no n_instructions (a series written before it was kept): empty
    assert ts["series_isn"].rows[7] == ["b", "code", None, 101, 111, 121, 131, 141, 151, 161, 171] + [None] * 8
    assert ts["series_isn_model"].rows == [["a", 1, 3, 5, 7] + [None] * 4, ["b", 2, 4, 6, 8] + [None] * 4]
    assert ts["precision"].header == ["category", "bf16"] and ts["precision"].rows[2] == ["general_qa", 2]
    assert T.safe_name("__a b/c__") == "a_b_c" and T.safe_name("//") == "model"


def per_cat_lists(base):
    """{category: [value at checkpoint 0, at checkpoint 1]}: base + i, base + 100 + i."""
    return {c: [base + i, base + 100 + i] for i, c in enumerate(CATEGORIES)}


@pytest.mark.parametrize("absent", ["bootstrap", "permutation"])
def test_without_bootstrap_or_permutation_the_cells_are_empty(absent):
    s = section()
    del s[absent]
    t = tables(s)["m_x_isn_dominance"]
    if absent == "bootstrap":
        assert (t[0]["low"], t[0]["bias"], t[6]["outside"]) == (None, None, None)
    else:
        assert (t[0]["permutation_p"], t[0]["permutation_p_holm"], t[6]["permutation_p"]) == (None, None, None)
