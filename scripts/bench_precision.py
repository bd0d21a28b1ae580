#!/usr/bin/env python
"""Precision, measured (issue 13, section 5): do bfloat16 counts find the same units as float32?

    python scripts/bench_precision.py                                  # demo-sized models, random weights (CPU)
    python scripts/bench_precision.py --shapes llama1b,olmoe4          # accelerators, random weights
    python scripts/bench_precision.py --models demo_out/checkpoints/llama-chat/hf --template chat

For each model, counts are collected three times over the same sequences and weights:
  - "float32": float32 compute (every matmul in full float32), the reference;
  - "bfloat16": the weights rounded to bfloat16, bfloat16 compute (what users run on
    accelerators);
  - "bfloat16, float32 gate and weights": bfloat16 compute, but the weights kept in
    float32 (`param_dtype="float32"`) and the gate projection (whose sign is what is
    counted) computed in float32 from them, through the library's `gate_dtype="float32"`
    (reported as not available where this version has no such option). With the weights
    in bfloat16 a float32 gate could not help: bfloat16 products already accumulate in
    float32, so the gate's sign would be the bfloat16 gate's.
Each variant's counts are identified with the default rule (`IdentifyConfig()`: top 1%
per instruction, consensus q = 0.5), per count field: ISNs (`neuron_active`), ISEs
(`expert_routed`) and expert neurons (`expert_neuron_active`). Reported against float32:
  - the share of per-instruction count entries that differ;
  - the mean over instructions of the Jaccard index of S(I);
  - per category, the Jaccard index of the consensus set S(c);
  - tokens/s of each variant (a second, warm call).

Random weights with random tokens are a stress test (activations of a random model sit
near the gate's sign boundary more than a trained model's may); `--models` runs real
checkpoints on the shipped instructions (content scope) instead. Random sequences are given
the six categories in turn, so their category sets differ only by chance: read them as
"how stable is a consensus set under rounding", not as category findings.

Writes the section <!-- precision:MACHINE --> of --out and the key "precision" of --json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import (  # noqa: E402
    NOT_AVAILABLE, accepts, device_name, make_sequences, replace_section, shape, stamp, update_results,
)

FIELDS = {"neuron_active": "ISN", "expert_routed": "ISE", "expert_neuron_active": "expert neurons"}
VARIANTS = (("float32", "float32", None), ("bfloat16", "bfloat16", None),
            ("bfloat16, float32 gate and weights", "bfloat16", "float32"))


def demo_shapes() -> list[tuple[str, dict]]:
    """The demo's model pairs' architectures (random weights, vocabulary 512)."""
    from sparcom_jax.config import DemoConfig

    out = []
    for p in DemoConfig().pairs:
        a = dict(p.architecture, vocab_size=512)
        moe = f", {a['num_local_experts']} x {a['intermediate_size']}" if a.get("num_local_experts") else \
            f", F{a['intermediate_size']}"
        out.append((f"demo {p.name} ({a['num_hidden_layers']}L, D{a['hidden_size']}{moe})", a))
    return out


def shipped_records(n_per_category: int):
    """The shipped instructions, balanced; read without `datasets` where it is not installed."""
    import sparcom_jax as sj

    if importlib.util.find_spec("datasets") is None:
        from sparcom_jax.data.loaders import SHIPPED_PATH
        from sparcom_jax.data.records import Record, validate_row
        from sparcom_jax.data.sampling import sample_balanced

        lines = SHIPPED_PATH.read_text(encoding="utf-8").splitlines()
        recs = [validate_row(json.loads(ln), str(SHIPPED_PATH), str(i)) for i, ln in enumerate(lines, 1) if ln.strip()]
        bad = [r for r in recs if not isinstance(r, Record)]
        if bad:
            raise ValueError(f"shipped records do not validate: {bad[0]}")
        return sample_balanced(recs, n_per_category, seed=0)
    return sj.load_instructions(n_per_category=n_per_category)


def gate_supported(*fns) -> bool:
    return all(accepts(f, "gate_dtype") for f in fns)


def cast_model(cfg, base, dtype: str, gate: str | None):
    """`base`'s float32 weights as a model of another compute dtype (rounded as loading an
    float32 checkpoint in that dtype rounds them), or with a float32 gate kept in float32."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import sparcom_jax as sj

    kw = {"gate_dtype": gate, "param_dtype": "float32"} if gate else {}
    if accepts(sj.abstract_model, "gate_dtype") or not gate:
        model = sj.abstract_model(cfg, dtype=dtype, **kw)
    else:  # gate_dtype only on init_model: a throwaway random model, then our weights
        model = sj.init_model(cfg, dtype=dtype, seed=0, **kw)
    src = nnx.state(base, nnx.Param)
    dst = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda s, d: jnp.asarray(s, dtype=d.dtype), src, dst))
    return model


def collect_timed(model, seqs, scopes, cats, batch: int, buckets):
    """(counts of a first call, tokens/s of a second, warm call over the same sequences)."""
    import sparcom_jax as sj

    def run():
        return sj.collect_counts(model, seqs, scopes, batch_size=batch, buckets=buckets, categories=cats,
                                 progress=False)

    counts = run()
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    n_tok = int(np.asarray(counts.tokens).sum())
    return counts, n_tok / wall


def compare(ref, var) -> dict:
    """Agreement of `var`'s counts and sets with `ref`'s, per count field."""
    from sparcom_jax.analysis import IdentifyConfig, compare_sets, identify

    out = {}
    for field in FIELDS:
        a, b = getattr(ref, field, None), getattr(var, field, None)
        if a is None:
            continue
        a, b = np.asarray(a), np.asarray(b)
        ia, ib = identify(ref, field, IdentifyConfig()), identify(var, field, IdentifyConfig())
        sa = ia.instruction_sets().reshape(ia.n, -1)
        sb = ib.instruction_sets().reshape(ib.n, -1)
        union = (sa | sb).sum(1)
        inst = np.where(union > 0, (sa & sb).sum(1) / np.maximum(union, 1), 1.0)
        cat = compare_sets(ia.category_sets, ib.category_sets)
        out[field] = {"entries_differ": float((a != b).mean()), "instruction_jaccard_mean": float(inst.mean()),
                      "instruction_jaccard_min": float(inst.min()),
                      "category_jaccard": [None if np.isnan(j) else float(j) for j in cat["jaccard"]],
                      "category_size_ref": [int(x) for x in cat["size_before"]],
                      "category_size": [int(x) for x in cat["size_after"]]}
    return out


def bench_one(label: str, make, seqs, scopes, cats, args, gate_ok: bool) -> dict:
    """Every variant of one model; `make(dtype, gate)` builds the model of a variant."""
    from sparcom_jax.data.batching import fit_buckets

    import jax

    buckets = fit_buckets([len(s) for s in seqs], args.batch, args.max_buckets,
                          align=1 if jax.default_backend() == "cpu" else 8)
    res = {"label": label, "n": len(seqs), "tokens": int(sum(len(s) for s in seqs)), "variants": {}}
    ref = None
    for name, dtype, gate in VARIANTS:
        if gate and not gate_ok:
            res["variants"][name] = {"error": NOT_AVAILABLE}
            continue
        try:
            counts, tps = collect_timed(make(dtype, gate), seqs, scopes, cats, args.batch, buckets)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a row, not the end of the run
            res["variants"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        v = {"tokens_per_s": tps}
        if ref is None:
            ref = counts
        else:
            v["vs_float32"] = compare(ref, counts)
        res["variants"][name] = v
        print(f"{label} / {name}: {tps:,.0f} tok/s", flush=True)
    return res


def table(results: list[dict]) -> list[str]:
    from sparcom_jax.categories import CATEGORIES, SHORT_NAMES

    lines = ["| model | variant | tok/s | count entries differing from float32 (" + " / ".join(FIELDS.values())
             + ") | instruction-set Jaccard vs float32, mean (min) | category-set Jaccard vs float32 ("
             + ", ".join(SHORT_NAMES[c] for c in CATEGORIES) + ") |", "|---|---|---|---|---|---|"]
    for r in results:
        for name, v in r["variants"].items():
            if "error" in v:
                lines.append(f"| {r['label']} | {name} | {v['error']} | | | |")
                continue
            cmp = v.get("vs_float32")
            if cmp is None:
                lines.append(f"| {r['label']} | {name} (reference) | {v['tokens_per_s']:,.0f} | — | — | — |")
                continue

            differ = " / ".join(f"{FIELDS[f]} {c['entries_differ']:.2%}" for f, c in cmp.items())
            inst = " / ".join(f"{FIELDS[f]} {c['instruction_jaccard_mean']:.3f} ({c['instruction_jaccard_min']:.2f})"
                              for f, c in cmp.items())
            cats = "<br>".join(
                f"{FIELDS[f]}: " + ", ".join("—" if j is None else f"{j:.2f}" for j in c["category_jaccard"])
                for f, c in cmp.items())
            lines.append(f"| {r['label']} | {name} | {v['tokens_per_s']:,.0f} | {differ} | {inst} | {cats} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="'demo' (the demo's two architectures) or comma-separated "
                                                   "keys of bench_common.SHAPES (default: demo on CPU, "
                                                   "llama1b,olmoe4 elsewhere); random weights")
    ap.add_argument("--tiny", action="store_true", help="shrink --shapes to toy size (CPU dry runs)")
    ap.add_argument("--models", nargs="*", default=[], help="real HF model directories (instead of --shapes), "
                                                            "counted on the shipped instructions")
    ap.add_argument("--template", default="chat", help="template for --models: plain or chat")
    ap.add_argument("--n-per-category", type=int, default=None,
                    help="sequences per category (default 16 on CPU, 60 otherwise; --models: up to 60)")
    ap.add_argument("--min-len", type=int, default=30)
    ap.add_argument("--max-len", type=int, default=None, help="default 128 on CPU, 250 otherwise")
    ap.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 32 otherwise")
    ap.add_argument("--max-buckets", type=int, default=2, help="bucket lengths (compilations per variant)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--json", default=None, help="results JSON to update (key 'precision')")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import jax

    import sparcom_jax as sj
    from sparcom_jax.categories import CATEGORIES
    from sparcom_jax.runtime import ensure_compilation_cache

    ensure_compilation_cache()  # model initialisation too: later runs (and steps) load its programs
    cpu = jax.default_backend() == "cpu"
    args.n_per_category = args.n_per_category or (16 if cpu else 60)
    args.max_len = args.max_len or (128 if cpu else 250)
    args.batch = args.batch or (8 if cpu else 32)
    results = []
    machine = device_name()

    def write(note: str) -> None:
        update_results(args.json, "precision", {"models": results, "gate_dtype_supported": gate_ok})
        if args.no_write:
            return
        body = [f"{stamp()}; {note}; default identification rule (top 1% per instruction, consensus q = 0.5); "
                f"`scripts/bench_precision.py {' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
                *table(results), "",
                "Float32 is the reference (every matmul in full float32). The bfloat16 variant uses the float32 "
                "weights rounded to bfloat16; the float32 gate's variant keeps them in float32. A Jaccard of 1.00 "
                "means the same set; the category sets are consensus sets (units in S(I) for at least half of the "
                "category's instructions); — marks a category whose sets are empty in both variants. Random weights "
                "and random tokens are a stress test; real checkpoints on the shipped instructions are the "
                "evidence for a precision default."]
        replace_section(Path(args.out), f"precision:{machine}", "\n".join(body),
                        title=f"Precision: float32 vs bfloat16 counts and sets (`scripts/bench_precision.py`) — "
                              f"{machine}")

    if args.models:
        gate_ok = gate_supported(sj.load_model)
        records = shipped_records(min(args.n_per_category, 60))
        note = (f"real checkpoints, {len(records)} shipped instructions, template {args.template}, content scope")
        from sparcom_jax.data import encode_records

        for d in args.models:
            def make(dtype, gate, d=d):
                return sj.load_model(d, dtype=dtype, with_tokenizer=False,
                                     **({"gate_dtype": gate, "param_dtype": "float32"} if gate else {}))

            tok = sj.load_tokenizer(d) or sj.default_tokenizer()  # as collect_instructions resolves it
            enc = encode_records(records, tok, template=args.template, scope="content", max_length=args.max_len)
            results.append(bench_one(str(d), make, enc.ids, enc.scopes, enc.categories, args, gate_ok))
            write(note)
        return 0

    gate_ok = gate_supported(sj.init_model)
    keys = args.shapes or ("demo" if cpu else "llama1b,olmoe4")
    models = demo_shapes() if keys == "demo" else [shape(k, args.tiny) for k in keys.split(",")]
    n = args.n_per_category * len(CATEGORIES)
    note = (f"random weights (normal, std 0.02), {n} random token sequences of {args.min_len}-{args.max_len} "
            "tokens given the six categories in turn")
    for label, hf in models:
        cfg = sj.ModelConfig.from_hf_config(hf)
        base = sj.init_model(cfg, dtype="float32", seed=0)
        seqs = make_sequences(n, args.min_len, args.max_len, cfg.vocab_size, seed=1)
        cats = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]

        def make(dtype, gate, cfg=cfg, base=base):
            return base if dtype == "float32" and not gate else cast_model(cfg, base, dtype, gate)

        results.append(bench_one(label, make, seqs, None, cats, args, gate_ok))
        write(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
