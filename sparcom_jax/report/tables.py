"""CSV tables derived from summary.json: one Table per file, all JSON-derived."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator

from sparcom_jax.categories import CATEGORIES, SHORT_NAMES

_SHORT = [SHORT_NAMES[c] for c in CATEGORIES]


@dataclasses.dataclass
class Table:
    """A named table: written as `<name>.csv`."""

    name: str
    header: list[str]
    rows: list[list[Any]]


def safe_name(name: str) -> str:
    """A string usable in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "model"


def _matrix(name: str, m) -> Table:
    return Table(name, ["category", *_SHORT], [[c, *row] for c, row in zip(CATEGORIES, m)])


def _boot(s: dict, key: str, c: str, bound: str):
    b = s.get("bootstrap") or {}
    if key not in b:
        return None
    return b[key][bound][CATEGORIES.index(c)]


def model_tables(model: str, section: str, s: dict) -> Iterator[Table]:
    """Tables of models.<model>.<section>."""
    p = f"{safe_name(model)}_{section}"
    yield Table(f"{p}_categories",
                ["category", "short", "n_instructions", "size", "size_low", "size_high", "unique",
                 "unique_low", "unique_high", "unique_ratio", "mean_instruction_set_size",
                 "mean_frequency"],
                [[c, SHORT_NAMES[c], s["n_per_category"][c], s["per_category_count"][c],
                  _boot(s, "per_category_count", c, "low"), _boot(s, "per_category_count", c, "high"),
                  s["unique"][c], _boot(s, "unique", c, "low"), _boot(s, "unique", c, "high"),
                  s["unique_ratio"][c], s["mean_instruction_set_size"][c], s["mean_frequency"][c]]
                 for c in CATEGORIES])
    yield _matrix(f"{p}_overlap_jaccard", s["overlap_jaccard"])
    yield _matrix(f"{p}_overlap_coefficient", s["overlap_coefficient"])
    if s.get("instruction_overlap") is not None:
        yield _matrix(f"{p}_instruction_overlap", s["instruction_overlap"])
    n_layers = len(s["union_per_layer"])
    yield Table(f"{p}_per_layer",
                ["layer", *[f"count_{x}" for x in _SHORT], "union", "general",
                 *[f"share_{x}" for x in _SHORT]],
                [[j, *[s["per_layer"][c][j] for c in CATEGORIES], s["union_per_layer"][j],
                  s["general_per_layer"][j], *[s["per_layer_share"][c][j] for c in CATEGORIES]]
                 for j in range(n_layers)])
    perm = s.get("permutation") or {}
    gen = [["general", s["general"]], ["union", s["union"]], ["general_share", s["general_share"]],
           ["diagonal_dominance", s["diagonal_dominance"]],
           ["permutation_p_value", perm.get("p_value")], ["permutation_n", perm.get("n_perm")]]
    gen += [[f"breadth_{k}", v] for k, v in s["breadth_histogram"].items()]
    yield Table(f"{p}_generality", ["metric", "value"], gen)
    yield Table(f"{p}_phases",
                ["profile", "middle_starts", "late_starts", "early_mean", "middle_mean", "late_mean",
                 "explained", "early_dominant"],
                [[k, *(ph["boundaries"] or [None, None]),
                  *[(ph[x] or {}).get("mean") for x in ("early", "middle", "late")],
                  ph["explained"], ph["early_dominant"]] for k, ph in s["phases"].items()])


def comparison_tables(section: str, comp: dict) -> Iterator[Table]:
    """Tables of comparison.<section>."""
    keys = ["size_before", "size_after", "retained", "gained", "lost", "jaccard"]
    yield Table(f"comparison_{section}",
                ["category", *keys, "mean_p_before", "mean_p_after", "mean_p_delta"],
                [[c, *[comp[c][k] for k in keys],
                  *[comp[c]["frequency_shift"][k] for k in ("mean_before", "mean_after", "delta")]]
                 for c in CATEGORIES])
    rows = []
    for c in CATEGORIES:
        pl = comp[c]["per_layer"]
        for j in range(len(pl["size_before"])):
            rows.append([c, j, *[pl[k][j] for k in keys], comp[c]["frequency_shift"]["per_layer_delta"][j]])
    yield Table(f"comparison_{section}_per_layer", ["category", "layer", *keys, "mean_p_delta"], rows)


def ablation_tables(kind: str, d: dict) -> Iterator[Table]:
    """Tables of one ablation result dict (AblationResult.to_dict())."""
    for k in ("isn", "random", "excess"):
        t = _matrix(f"ablation_{kind}_{k}", d[k])
        t.header[0] = "ablated \\ evaluated"
        yield t
    yield Table(f"ablation_{kind}_baseline", ["category", "baseline_loss", "set_size"],
                [[c, d["baseline"].get(c), d["set_sizes"][c]] for c in CATEGORIES])


def series_tables(section: str, names: list[str], t: dict) -> Iterator[Table]:
    """Tables of series.<section>."""
    rows = []
    for i, n in enumerate(names):
        for c in CATEGORIES:
            rows.append([n, c, t["per_category_count"][c][i], t["unique"][c][i], t["unique_ratio"][c][i],
                         t["vs_base"]["jaccard"][c][i], t["vs_previous"]["jaccard"][c][i],
                         t["vs_previous"]["retained"][c][i], t["vs_previous"]["gained"][c][i],
                         t["vs_previous"]["lost"][c][i]])
    yield Table(f"series_{section}",
                ["checkpoint", "category", "size", "unique", "unique_ratio", "jaccard_vs_first",
                 "jaccard_vs_previous", "retained_vs_previous", "gained_vs_previous", "lost_vs_previous"],
                rows)
    yield Table(f"series_{section}_model", ["checkpoint", "general", "union", "general_share",
                                            "diagonal_dominance"],
                [[n, t["general"][i], t["union"][i], t["general_share"][i], t["diagonal_dominance"][i]]
                 for i, n in enumerate(names)])


def all_tables(summary: dict) -> Iterator[Table]:
    """Every table of a summary."""
    for m, ms in summary["models"].items():
        for sec, s in ms.items():
            if sec != "meta":
                yield from model_tables(m, sec, s)
    comp = summary.get("comparison") or {}
    for sec, v in comp.items():
        if sec not in ("before", "after", "moves"):
            yield from comparison_tables(sec, v)
    for kind in ("neurons", "experts"):
        d = (summary.get("ablation") or {}).get(kind)
        if d:
            yield from ablation_tables(kind, d)
    series = summary.get("series") or {}
    for sec, t in series.items():
        if sec != "names":
            yield from series_tables(sec, series["names"], t)
