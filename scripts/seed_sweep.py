#!/usr/bin/env python
"""How much do the demo's causal-check results move with the seed? Run the demo's model pairs
for K seeds and tabulate, per category, how many seeds pass and how far the excess moves.

    PYTHONPATH=$PWD python scripts/seed_sweep.py --seeds 5 --work runs/seed_sweep        # the MoE pair
    PYTHONPATH=$PWD python scripts/seed_sweep.py --seeds 5 --pairs mixtral,llama --fast  # a smoke run
    PYTHONPATH=$PWD python scripts/seed_sweep.py --from-json runs/seed_sweep/seed_sweep.json  # table only
    PYTHONPATH=$PWD python scripts/seed_sweep.py --from-json A/seed_sweep.json B/seed_sweep.json  # merged

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

    controls = "excess vs random (p)" + ("; excess vs mass-matched (p)" if mass else "")
    several = len({r["pair"] for r in rows}) > 1
    lines = [f"{label.capitalize()}{f' ({pair})' if several else ''} per seed: set size: {controls}.", "",
             "| category | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for cat in dict.fromkeys(r["category"] for r in unit):
        lines.append(f"| {cat} | " + " | ".join(cell(by.get((cat, s))) for s in seeds) + " |")
    return [*lines, ""]


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


def run_seed(seed: int, args) -> tuple[list[dict], int, float]:
    """One demo run with seed `seed`: its rows, its number of random draws, its seconds."""
    from sparcom_jax.pipeline.demo import run_demo

    cfg = sweep_config(seed, args.pairs, args.fast, args.override)
    t = time.perf_counter()
    res = run_demo(Path(args.work) / f"seed{seed}", cfg=cfg, overwrite=args.overwrite)
    took = time.perf_counter() - t
    pairs = json.loads(Path(res["summary"]).read_text())["pairs"]
    rows = [r for p in args.pairs for r in seed_rows(seed, p, pairs[p])]
    return rows, cfg.ablation.n_random, took


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
    return {**first, "seeds": seeds, "rows": [r for s in sweeps for r in s["rows"]], "seconds": seconds,
            "n_random": [x for s in sweeps for x in s["n_random"]], "seconds_per_seed": float(np.mean(seconds)),
            "code": join("code"), "stamp": join("stamp"), "versions": join("versions")}


def write_docs(result: dict, path: str | None) -> None:
    if path:
        replace_section(Path(path), section_key(result["pairs"]), section(result))
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
    args = ap.parse_args(argv)
    docs = None if args.no_docs else args.docs
    if args.from_json:
        write_docs(merge_sweeps([load_sweep(f) for f in args.from_json]), docs)
        return 0
    args.pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    seeds = ([int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds)))
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds/--seed-list: {seeds}: seeds must be distinct and >= 0")
    sweep_config(seeds[0], args.pairs, args.fast, args.override)  # bad pairs or overrides stop here
    json_path = args.json or str(Path(args.work) / "seed_sweep.json")
    result = {"seeds": [], "pairs": args.pairs, "fast": args.fast, "overrides": args.override,
              "alpha": args.alpha, "rows": [], "n_random": [], "seconds": [], "code": code_version(),
              "stamp": stamp(), "versions": _versions(), "seconds_per_seed": 0.0}
    from sparcom_jax.errors import ConfigError, LockedError

    for seed in seeds:
        try:
            rows, n_random, took = run_seed(seed, args)
        except (ConfigError, LockedError) as e:  # stale outputs (--overwrite), a bad override, a busy WORK
            done = f"; the seeds finished before it are in {json_path}" if result["seeds"] else ""
            raise SystemExit(f"seed_sweep: seed {seed}: {e}{done}") from None
        result["seeds"].append(seed)
        result["rows"] += rows
        result["n_random"].append(n_random)
        result["seconds"].append(took)
        result["seconds_per_seed"] = float(np.mean(result["seconds"]))
        update_results(json_path, SECTION, result)  # after every seed: a stopped sweep keeps what it ran
        print(f"seed_sweep: seed {seed} done in {took:.0f} s", file=sys.stderr)
    write_docs(result, docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
