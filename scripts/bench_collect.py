#!/usr/bin/env python
"""Benchmark the statistics engine against transformers and write the table into docs/benchmarks.md.

Measured in one run on one machine, per model (random weights, random token sequences):
  1. tokens/s of `collect_counts`, for MoE models once per dispatch strategy the library
     offers for this backend (on GPU: "capacity", "ragged", "grouped" (tokamax's kernel where
     installed) and any newer one; strategies that fail are reported as failed, not dropped);
  2. achieved TFLOP/s of collect_counts (matmul FLOPs of the useful work, no LM head;
     attention scores not counted) and its share of the measured matmul peak;
  3. the jitted plain forward of the same model on exactly the batches collect plans
     (the overhead of counting), unless --no-forward;
  4. transformers (PyTorch) on the same sequences in length-sorted batches: the plain
     decoder forward (`model.model`, no counting; MoE experts with transformers' default
     implementation, grouped_mm) and, with --baselines hooks, the decoder with forward hooks
     counting (act > 0) on the device (for MoE the experts' loop patched to count per
     expert, LAPE-style);
  5. the first call of collect_counts (compilations included) and how many XLA programs it
     compiled;
  6. on CPU, peak host memory of a store-mode collection vs number of instructions.

All variants are warmed up, then timed in alternation (best of --repeats), so slow drifts
of a shared machine do not favour whichever runs first. Each model's rows are written as
soon as they are measured (a run cut short keeps what it measured), into the section
<!-- SECTION:MACHINE:start --> of --out, and as JSON into --json.

Usage: python scripts/bench_collect.py [--models small|gpu|moe|KEY,KEY] [--tiny] [--n N]
       [--min-len 64] [--max-len 511] [--batch B] [--max-buckets K] [--baselines plain,hooks]
       [--no-forward] [--no-torch] [--no-memory] [--peak-flops X] [--section collect]
       [--out docs/benchmarks.md] [--json results.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import (  # noqa: E402
    NOT_AVAILABLE, PRESETS, accepts, device_name, make_sequences, met_word, moe_strategies, on_cpu, peak_flops,
    replace_section, shape, stamp, target, update_results,
)

# Dispatch strategies that exist for the CPU (slow elsewhere): not timed on accelerators.
CPU_ONLY_STRATEGIES = {"tiled", "looped"}
# Targets of issue 15 (share of the measured bf16 matmul peak; speed-up vs transformers' plain decoder forward).
TARGETS = {"dense": (0.55, 1.3), "moe": (0.40, 1.5)}


def forward_flops(cfg, n_tokens: int) -> float:
    """2 * (matmul parameters touched per token) * tokens, without the LM head.

    Attention scores and weighted sums are not counted (about 5% of a 1B model's
    FLOPs at 300 tokens), nor the capacity buffer's padding rows: this is the useful
    work, the same for every strategy and for transformers.
    """
    D, L = cfg.hidden_size, cfg.num_layers
    attn = D * cfg.q_width + 2 * D * cfg.kv_width + cfg.q_width * D
    width = cfg.top_k * cfg.moe_intermediate_size if cfg.is_moe else cfg.intermediate_size
    ffn = 3 * D * width + (D * cfg.num_experts if cfg.is_moe else 0)
    if cfg.is_moe and cfg.has_shared_expert:
        ffn += 3 * D * cfg.shared_expert_intermediate_size
    return 2.0 * L * (attn + ffn) * n_tokens


def time_interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """(best wall time, first-call time) of each callable: each is called once (compilation,
    allocator, caches), then all are called in turn `repeats` times."""
    first = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        first[k] = time.perf_counter() - t0
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, first


def strategies_for(cfg, requested: str | None) -> tuple[list[str | None], list[str]]:
    """(MoE strategies to time, requested ones this library version does not offer).

    Dense models: [None] (the library's default). Default request: "auto" on CPU; on
    accelerators "capacity", "ragged", "grouped" and any other strategy the library
    offers except "auto" and the CPU-only ones.
    """
    import sparcom_jax as sj

    if not cfg.is_moe:
        return [None], []
    offered = moe_strategies() if accepts(sj.init_model, "moe_impl") else ()
    if requested:
        want = [s for s in requested.split(",") if s]
    elif on_cpu():
        want = ["auto"]
    else:
        want = ["capacity", "ragged", "grouped"]
        want += [s for s in offered if s not in want and s != "auto" and s not in CPU_ONLY_STRATEGIES]
    return [s for s in want if s in offered], [s for s in want if s not in offered]


def jax_runs(hf: dict, seqs, batch_size: int, dtype: str, buckets, strategies, with_forward: bool,
             with_sums: bool = False):
    """Callables: collect_counts per strategy (sharing one set of weights), the plain forward,
    and with `with_sums` the first strategy's collect_counts(sums=True) (the tie-break strengths).

    Returns (cfg, padding fraction, {name: callable}, {strategy: error message}, {name: counts meta}).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import sparcom_jax as sj
    from sparcom_jax.data.batching import pad_batch, plan_batches

    cfg = sj.ModelConfig.from_hf_config(hf)
    runs, errors, metas = {}, {}, {}
    base = None
    for strat in strategies:
        kw = {} if strat is None else {"moe_impl": strat}
        try:
            if base is None:
                model = base = sj.init_model(cfg, seed=0, dtype=dtype, **kw)
            else:  # the same weights under another strategy: no second copy on the device
                model = sj.abstract_model(cfg, dtype=dtype, **kw)
                nnx.update(model, nnx.state(base))
        except Exception as e:  # noqa: BLE001 - a strategy this backend cannot build is a table row
            errors[strat] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        name = f"collect@{strat or 'default'}"

        def collect(model=model, name=name, sums=False):
            c = sj.collect_counts(model, seqs, batch_size=batch_size, buckets=buckets, progress=False, sums=sums)
            metas.setdefault(name, c.meta)  # the first call's meta: its compilations
            n_counted = int(np.asarray(c.tokens).sum())
            if n_counted != sum(len(s) for s in seqs):
                raise AssertionError(f"{name} counted {n_counted} tokens of {sum(len(s) for s in seqs)}")

        runs[name] = collect
        if with_sums and len(runs) == 1:
            runs[name + "+sums"] = lambda collect=collect, name=name: collect(name=name + "+sums", sums=True)
    if base is None:
        return cfg, 0.0, runs, errors, metas
    lengths = [len(s) for s in seqs]
    plan = plan_batches(lengths, batch_size, buckets, pad_rows=True, group="sorted")
    if with_forward:
        # The plain forward runs exactly the batches collect_counts plans (same buckets), so
        # the difference is the counting itself plus collect's host work.
        batches = [pad_batch([seqs[i] for i in b.indices], b.length, rows=b.rows) for b in plan.batches]
        graphdef, state = nnx.split(base)

        @jax.jit
        def fwd_hidden(state, ids, mask):
            return nnx.merge(graphdef, state).forward(ids, mask, with_logits=False).hidden

        def forward():
            jax.block_until_ready([fwd_hidden(state, jnp.asarray(i), jnp.asarray(m)) for i, m in batches])

        runs["forward"] = forward
    return cfg, plan.padding_fraction, runs, errors, metas


def torch_runs(hf: dict, seqs, batch_size: int, dtype: str, baselines: list[str]):
    """What users write today, on the same sequences in length-sorted batches.

    "torch_plain": the decoder stack (`model.model`) with no counting; MoE experts run
    transformers' default implementation (grouped_mm where available). "torch_hooks":
    the decoder of a second copy with forward hooks on `act_fn` accumulating (act > 0)
    per neuron on the device; for MoE the experts' forward replaced by a loop that
    counts per expert (LAPE-style). Returns ({name: callable}, experts implementation).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def build():
        torch.manual_seed(0)
        with torch.device(dev):  # initialised where it runs: no host copy of a multi-GB model
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf), dtype=getattr(torch, dtype)).eval()

    order = np.argsort([len(s) for s in seqs], kind="stable")
    batches = []
    for s in range(0, len(seqs), batch_size):
        idx = order[s:s + batch_size]
        T = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.from_numpy(seqs[i].astype(np.int64))
            mask[r, : len(seqs[i])] = 1
        batches.append((ids.to(dev), mask.to(dev)))
    state = {"mask": None, "counts": []}

    def run(model, count_shapes=None):
        def go():
            if count_shapes is not None:
                state["counts"] = [torch.zeros(shp, dtype=torch.long, device=dev) for shp in count_shapes]
            with torch.inference_mode():
                for ids, mask in batches:
                    state["mask"] = mask.bool()
                    model.model(input_ids=ids, attention_mask=mask)
            if dev == "cuda":
                torch.cuda.synchronize()
        return go

    runs, experts_impl = {}, None
    if "plain" in baselines:
        plain = build()
        experts_impl = getattr(plain.config, "_experts_implementation", None)
        runs["torch_plain"] = run(plain)
    if "hooks" in baselines:
        hooked = build()
        runs["torch_hooks"] = run(hooked, _install_counting(hooked, state))
    return runs, experts_impl


def _install_counting(model, state) -> list[tuple[int, ...]]:
    """Counting hooks on every layer of a transformers model; returns each layer's count shape."""
    import torch

    shapes = []
    for li, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            def hook(m, i, o, li=li):
                state["counts"][li] += ((o > 0) & state["mask"][..., None]).sum((0, 1))
            layer.mlp.act_fn.register_forward_hook(hook)
            shapes.append((layer.mlp.down_proj.in_features,))
            continue

        def forward(hidden, top_k_index, top_k_weights, experts=experts, li=li):
            out = torch.zeros_like(hidden)
            flat_mask = state["mask"].reshape(-1)
            for e in range(experts.num_experts):
                tok, pos = torch.where(top_k_index == e)
                if tok.numel() == 0:
                    continue
                gate, up = torch.nn.functional.linear(hidden[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
                act = experts.act_fn(gate)
                state["counts"][li][e] += ((act > 0) & flat_mask[tok, None]).sum(0)
                y = torch.nn.functional.linear(act * up, experts.down_proj[e])
                out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
            return out

        experts.forward = forward
        shapes.append((experts.num_experts, experts.down_proj.shape[-1]))
    return shapes


MEM_SCRIPT = textwrap.dedent("""
    import resource, sys, tempfile, numpy as np
    import sparcom_jax as sj
    n = int(sys.argv[1])
    cfg = sj.ModelConfig.from_hf_config(dict(model_type="llama", vocab_size=512, hidden_size=64,
        intermediate_size=2048, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4))
    model = sj.init_model(cfg)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 512, 24).astype(np.int32) for _ in range(n)]
    with tempfile.TemporaryDirectory() as d:
        sj.collect_counts(model, seqs, batch_size=16, out=d, chunk_rows=64, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
""")


def bench_memory(ns):
    out = {}
    for n in ns:
        r = subprocess.run([sys.executable, "-c", MEM_SCRIPT, str(n)], capture_output=True, text=True, check=True)
        out[n] = float(r.stdout.strip().splitlines()[-1])
    return out


def bench_model(key: str, args, seqs, peak: float, emit) -> dict:
    """Every variant of one model; returns its JSON entry.

    The first strategy (the library's default on CPU, "capacity" on GPU), the plain
    forward and the transformers baselines are timed in alternation; every further
    strategy is timed after them, alone, against the same baseline times. `emit(rows,
    entry)` is called after each strategy, so a run cut short keeps what it measured.
    """
    import sparcom_jax as sj
    from sparcom_jax.data.batching import fit_buckets

    label, hf = shape(key, args.tiny)
    moe = sj.ModelConfig.from_hf_config(hf).is_moe
    strategies, missing = strategies_for(sj.ModelConfig.from_hf_config(hf), args.strategies)
    lengths = [len(s) for s in seqs]
    n_tok = sum(lengths)
    buckets = fit_buckets(lengths, args.batch, args.max_buckets, align=1 if on_cpu() else 8)
    cfg, padding, runs, errors, metas = jax_runs(hf, seqs, args.batch, args.dtype, buckets, strategies,
                                                 with_forward=not args.no_forward, with_sums=not args.no_sums)
    flops = forward_flops(cfg, n_tok)
    share_goal, speed_goal = TARGETS["moe" if moe else "dense"]
    entry = {"label": label, "tokens": n_tok, "padding": padding, "batch": args.batch, "buckets": list(buckets),
             "strategies": {}, "experts_implementation_transformers": None, "torch_tokens_per_s": {},
             "targets": []}
    rows: list[str] = []
    nb = len(buckets)
    where = f"{n_tok:,} ({padding:.0%} padding), batch {args.batch}, {nb} bucket{'s' if nb != 1 else ''}"

    def row(strat, t_best: float, t_first: float, forward_s: float | None):
        name = f"collect@{strat or 'default'}"
        tps = n_tok / t_best
        share = flops / t_best / peak
        comp = metas.get(name, {}).get("compilations", {}).get("compilations")
        e = {"tokens_per_s": tps, "tflops": flops / t_best / 1e12, "share_of_peak": share,
             "first_call_s": t_first, "compilations": comp}
        cells = [f"{tps:,.0f}", f"{flops / t_best / 1e12:.3g} ({share:.0%})"]
        if forward_s is not None:
            e["forward_tokens_per_s"] = n_tok / forward_s
            cells.append(f"{n_tok / forward_s:,.0f} ({t_best / forward_s - 1:+.1%})")
        else:
            cells.append("n/a")
        for base in ("torch_plain", "torch_hooks"):
            b = entry["torch_tokens_per_s"].get(base)
            if b:
                e[f"speedup_vs_{base}"] = tps / b
                cells.append(f"{b:,.0f} ({tps / b:.2f}x)")
            else:
                cells.append("n/a")
        cells.append(f"{t_first:.1f} ({comp if comp is not None else '?'})")
        rows.append(f"| {label} | {strat or 'default'} | {where} | " + " | ".join(cells) + " |")
        entry["strategies"][strat or "default"] = e

    def update_targets():
        ok = {k: v for k, v in entry["strategies"].items() if "error" not in v}
        if not ok:
            entry["targets"] = [target(f"{label}: collect_counts", "no strategy ran", "runs", False)]
            return
        bname, b = max(ok.items(), key=lambda kv: kv[1]["tokens_per_s"])
        sp = b.get("speedup_vs_torch_plain")
        entry["targets"] = [
            target(f"{label}: share of measured peak ({bname})", f"{b['share_of_peak']:.0%}", f">= {share_goal:.0%}",
                   b["share_of_peak"] >= share_goal),
            target(f"{label}: speed-up vs transformers plain decoder ({bname})", "n/a" if sp is None else f"{sp:.2f}x",
                   f">= {speed_goal}x", None if sp is None else sp >= speed_goal)]

    def done(new_rows):
        update_targets()
        for r in new_rows:
            print(r, flush=True)
        emit(new_rows, entry)

    for strat in [s for s in strategies if s in errors]:
        n0 = len(rows)
        rows.append(f"| {label} | {strat} | failed: {errors[strat]} |" + " |" * 6)
        entry["strategies"][strat] = {"error": errors[strat]}
        done(rows[n0:])
    live = [s for s in strategies if s not in errors]
    if live:
        name = f"collect@{live[0] or 'default'}"
        group = {k: v for k, v in runs.items() if k in (name, name + "+sums", "forward")}
        if not args.no_torch:
            truns, entry["experts_implementation_transformers"] = torch_runs(hf, seqs, args.batch, args.dtype,
                                                                             args.baselines)
            group.update(truns)
        best, first = time_interleaved(group, args.repeats)
        entry["torch_tokens_per_s"] = {k: n_tok / v for k, v in best.items() if k.startswith("torch")}
        if name + "+sums" in best:
            entry["sums"] = {"strategy": live[0] or "default", "tokens_per_s": n_tok / best[name + "+sums"],
                             "time_vs_counts_only": best[name + "+sums"] / best[name] - 1}
        row(live[0], best[name], first[name], best.get("forward"))
        done(rows[-1:])
        for strat in live[1:]:
            name = f"collect@{strat}"
            best, first = time_interleaved({name: runs[name]}, args.repeats)
            row(strat, best[name], first[name], None)
            done(rows[-1:])
    for strat in missing:
        rows.append(f"| {label} | {strat} | {NOT_AVAILABLE} |" + " |" * 6)
        entry["strategies"][strat] = {"error": NOT_AVAILABLE}
        done(rows[-1:])
    return entry


HEAD = ("| model | MoE strategy | tokens, batch, buckets | collect_counts tok/s | achieved TFLOP/s (share of "
        "measured peak) | jitted plain forward, no head, tok/s (counting overhead) | transformers plain decoder "
        "tok/s (speed-up) | transformers + hooks tok/s (speed-up) | first call s (XLA compilations) |")

READING = (
    "Reading the table: tok/s count real (non-padding) tokens; best of the repeats after a warm-up call. The "
    "first strategy of a model, its plain forward and the transformers baselines are timed in alternation; "
    "further strategies are timed after them, each alone. TFLOP/s are the useful matmul FLOPs of the forward "
    "without the LM head (2 x matmul parameters touched per token; attention scores, capacity-buffer padding and "
    "the router's softmax not counted), over the large-matmul peak measured on the same device (below). The "
    "jitted plain "
    "forward runs exactly the batches `collect_counts` plans, so its column is the cost of counting plus "
    "collect's host work. transformers runs the same sequences in length-sorted batches padded only to each "
    "batch's longest member: `model.model(...)` (the decoder, no LM head), plain (its default attention and, for "
    "MoE, its default experts implementation) and with counting hooks (forward hooks on `act_fn`; for MoE the "
    "experts' loop patched to count per expert, LAPE-style). The first call includes tracing and XLA compilation "
    "of every bucket (the persistent cache of earlier runs can make it shorter). On a shared CPU whole runs can "
    "differ by several percent; compare rows of one run.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="preset (small, gpu, moe) or comma-separated shape keys "
                                                   "(default: small on CPU, gpu elsewhere)")
    ap.add_argument("--tiny", action="store_true", help="shrink every model to toy size (CPU dry runs)")
    ap.add_argument("--n", type=int, default=None, help="sequences per model (default 64 on CPU, 1024 otherwise)")
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=None, help="default 256 on CPU, 511 otherwise")
    ap.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 32 otherwise")
    ap.add_argument("--max-buckets", type=int, default=8, help="bucket lengths fitted to the data (compilations "
                                                               "per strategy); the library's default is 8")
    ap.add_argument("--dtype", default=None, help="compute dtype (default float32 on CPU, bfloat16 otherwise)")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes after the warm-up (default 3 CPU, 2)")
    ap.add_argument("--strategies", default=None, help="comma-separated MoE strategies (default: auto on CPU; "
                                                       "capacity, ragged, grouped and any newer one elsewhere)")
    ap.add_argument("--baselines", default="plain,hooks", help="transformers baselines: plain, hooks")
    ap.add_argument("--no-forward", action="store_true", help="skip the jitted plain forward (overhead column)")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--no-sums", action="store_true", help="skip timing collect_counts(sums=True) (tie-break "
                                                           "strengths) against counts only")
    ap.add_argument("--no-memory", action="store_true", help="skip the host-memory measurement (CPU only anyway)")
    ap.add_argument("--peak-flops", type=float, default=None, help="matmul peak to use (default: measured here)")
    ap.add_argument("--section", default="collect", help="docs section key prefix (key = SECTION:MACHINE)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--json", default=None, help="results JSON to update (key = --section)")
    ap.add_argument("--label", default=None, help="machine label for the table (default: detected)")
    args = ap.parse_args(argv)
    import jax

    from sparcom_jax.runtime import ensure_compilation_cache

    ensure_compilation_cache()  # model initialisation too: later runs (and steps) load its programs
    cpu = on_cpu()
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.n = args.n or (64 if cpu else 1024)
    args.max_len = args.max_len or (256 if cpu else 511)
    args.batch = args.batch or (8 if cpu else 32)
    args.repeats = args.repeats if args.repeats is not None else (3 if cpu else 2)
    args.baselines = [b for b in args.baselines.split(",") if b]
    models = args.models or ("small" if cpu else "gpu")
    keys = PRESETS.get(models) or models.split(",")
    peak = peak_flops(args.peak_flops, args.dtype)
    label = args.label or device_name()
    results = {"peak_flops": peak, "dtype": args.dtype, "n": args.n, "models": {}, "targets": []}
    rows = []

    def write(extra: list[str]):
        body = [
            f"{stamp()}; compute {args.dtype}; {args.n} random sequences of {args.min_len}-{args.max_len} tokens per "
            f"model; best of {args.repeats} after a warm-up; `scripts/bench_collect.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`.",
            "", HEAD, "|---|---|---|---|---|---|---|---|---|", *rows, "",
            f"Large-matmul peak: {peak / 1e12:.3g} TFLOP/s ("
            + ("given with --peak-flops: gpu_check's step 1, a bfloat16 matmul on this device"
               if args.peak_flops else f"measured by this script, {args.dtype}") + ").",
            "", *[f"- {t['target']}: {t['value']} (target {t['goal']}): **{met_word(t['met'])}**"
                  for t in results["targets"]],
            *[f"- {m['label']}: with the activation sums that break ties (`sums=True`, {m['sums']['strategy']}): "
              f"{m['sums']['tokens_per_s']:,.0f} tok/s, {m['sums']['time_vs_counts_only']:+.1%} time vs counts only"
              for m in results["models"].values() if "sums" in m],
            "", READING, *extra]
        replace_section(Path(args.out), f"{args.section}:{label}", "\n".join(body),
                        title=f"Statistics engine vs transformers ({args.section}) — {label}")
        update_results(args.json, args.section, results)

    vocab = min(shape(k, args.tiny)[1]["vocab_size"] for k in keys)
    seqs = make_sequences(args.n, args.min_len, args.max_len, vocab)
    for key in keys:
        def emit(new_rows, entry, key=key):
            rows.extend(new_rows)
            results["models"][key] = entry
            results["targets"] = [t for m in results["models"].values() for t in m["targets"]]
            write([])

        bench_model(key, args, seqs, peak, emit)
    if cpu and not args.no_memory:
        mem = bench_memory([64, 256, 1024] if args.n >= 64 else [32, 128])
        results["host_memory_mb"] = mem
        write(["", "Peak host memory of a store-mode collection vs number of instructions (8 layers x 2048 "
                   "neurons, chunks of 64 rows):", "", "| instructions | peak RSS (MB) |", "|---|---|",
               *[f"| {k} | {v:,.0f} |" for k, v in mem.items()]])
    for t in results["targets"]:
        print(f"TARGET {met_word(t['met'])}: {t['target']} = {t['value']} (goal {t['goal']})")
    print(f"jax {jax.__version__}; wrote section {args.section}:{label} of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
