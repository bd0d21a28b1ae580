#!/usr/bin/env python
"""Benchmark the statistics engine and write the table into docs/benchmarks.md.

Measured in one run on one machine:
  1. tokens/s of `collect_counts` vs the plain jitted forward of the same model
     (overhead of counting), for a ~33M-parameter Llama and a Mixtral-style MoE;
  2. tokens/s vs what users write today: transformers (PyTorch) with forward
     hooks on `act_fn` accumulating (act > 0) counts on-device, length-sorted
     batches of 8; for the MoE, transformers with the experts' forward patched
     to count per expert (LAPE-style);
  3. achieved FLOP/s against a large matmul on the same machine;
  4. peak host memory vs number of instructions (store mode, flat).

Both transformers baselines are timed: `model(...)` as users call it (logits
included) and the decoder stack alone. On accelerators the default also covers a
~1B dense Llama and a 2B Mixtral-style MoE in bfloat16 (batches of 32), and MoE
models are timed with both the default expert path and `ragged_dot`.

Usage: python scripts/bench_collect.py [--quick] [--models small|large|all] [--no-torch]
                                       [--no-memory] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import device_name, matmul_peak_flops, replace_section  # noqa: E402

LLAMA = dict(model_type="llama", vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
MIXTRAL = dict(model_type="mixtral", vocab_size=8000, hidden_size=512, intermediate_size=768, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
               max_position_embeddings=512)
# Accelerator-sized models (--models large): a ~1B dense Llama and a Mixtral-style MoE of
# the same width whose top-2 experts do the same FFN work per token.
LLAMA_1B = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
MIXTRAL_2B = dict(model_type="mixtral", vocab_size=32000, hidden_size=2048, intermediate_size=2816,
                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                  num_experts_per_tok=2, max_position_embeddings=2048)
MODELS = {
    "small": [("Llama 33M (8L, D512, F1536)", LLAMA), ("Mixtral-style MoE (8L, D512, 8x768, top-2)", MIXTRAL)],
    "large": [("Llama 1B (16L, D2048, F5632, GQA 16/4)", LLAMA_1B),
              ("Mixtral-style MoE 2B (16L, D2048, 8x2816, top-2)", MIXTRAL_2B)],
}


def make_sequences(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(rng.integers(lo, hi + 1))).astype(np.int32) for _ in range(n)]


def forward_flops(cfg, n_tokens: int, with_head: bool, counts_only: bool = False) -> float:
    """2 * (active params touched per token) * tokens (matmuls only; attention scores ignored).

    `counts_only`: without the last block's up and down products, which `collect_counts`
    skips on CPU (they feed nothing when only counts are wanted).
    """
    D, L = cfg.hidden_size, cfg.num_layers
    attn = D * cfg.q_width + 2 * D * cfg.kv_width + cfg.q_width * D
    width = cfg.top_k * cfg.moe_intermediate_size if cfg.is_moe else cfg.intermediate_size
    ffn = 3 * D * width + (D * cfg.num_experts if cfg.is_moe else 0)
    per_tok = L * (attn + ffn) + (D * cfg.vocab_size if with_head else 0) - (2 * D * width if counts_only else 0)
    return 2.0 * per_tok * n_tokens


def time_interleaved(fns: dict, repeats: int) -> dict:
    """Best wall time of each callable, warming every one up first and then alternating them.

    Alternating (a, b, c, a, b, c, ...) instead of timing each in a block keeps slow drifts
    of a shared machine from favouring whichever ran first.
    """
    for f in fns.values():
        f()  # warm-up: compilation, allocator, caches
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def jax_runs(hf: dict, seqs, batch_size: int, dtype: str, with_logits: bool, moe_impl: str = "auto"):
    """Callables for collect_counts and the plain jitted forward over the same batches."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import sparcom_jax as sj
    from sparcom_jax.data.batching import pad_batch, plan_batches
    from sparcom_jax.stats.runner import fitted_buckets

    cfg = sj.ModelConfig.from_hf_config(hf)
    model = sj.init_model(cfg, seed=0, dtype=dtype, moe_impl=moe_impl)

    def collect():
        sj.collect_counts(model, seqs, batch_size=batch_size, progress=False)

    # The plain forward runs exactly the batches collect_counts plans, so the
    # difference is the counting itself (plus collect's host-side work).
    lengths = [len(s) for s in seqs]
    plan = plan_batches(lengths, batch_size, fitted_buckets(lengths, batch_size), pad_rows=True, group="sorted")
    batches = [pad_batch([seqs[i] for i in b.indices], b.length, rows=b.rows) for b in plan.batches]
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd_hidden(state, ids, mask):
        return nnx.merge(graphdef, state).forward(ids, mask, with_logits=False).hidden

    @jax.jit
    def fwd_logits(state, ids, mask):
        return nnx.merge(graphdef, state).forward(ids, mask).logits

    def run(f):
        def go():
            outs = [f(state, jnp.asarray(ids), jnp.asarray(m)) for ids, m in batches]
            jax.block_until_ready(outs)
        return go

    runs = {"collect": collect, "forward_no_head": run(fwd_hidden)}
    if with_logits:
        runs["forward_logits"] = run(fwd_logits)
    return cfg, plan.padding_fraction, runs


def torch_runs(hf: dict, seqs, batch_size: int, dtype: str):
    """What users write today: transformers with counting hooks on length-sorted batches.

    Two callables: "torch_hooks", the usual `model(input_ids, attention_mask)` call
    (logits included, as in hook-based analyses), and "torch_hooks_no_head", the
    stricter baseline that calls only the decoder stack (`model.model`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = AutoConfig.for_model(**hf)
    model = AutoModelForCausalLM.from_config(cfg).to(dev, getattr(torch, dtype)).eval()
    order = np.argsort([len(s) for s in seqs])
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
    moe = hf["model_type"] == "mixtral"
    if not moe:
        for li, layer in enumerate(model.model.layers):
            def hook(m, i, o, li=li):
                c = ((o > 0) & state["mask"][..., None]).sum(1)
                state["counts"][li] += c.sum(0)
            layer.mlp.act_fn.register_forward_hook(hook)
    else:
        # LAPE-style: the experts' loop patched to count active neurons per expert.
        for li, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts

            def forward(hidden, top_k_index, top_k_weights, experts=experts, li=li):
                out = torch.zeros_like(hidden)
                flat_mask = state["mask"].reshape(-1)
                for e in range(experts.num_experts):
                    tok, pos = torch.where(top_k_index == e)
                    if tok.numel() == 0:
                        continue
                    x = hidden[tok]
                    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
                    act = experts.act_fn(gate)
                    state["counts"][li][e] += ((act > 0) & flat_mask[tok, None]).sum(0)
                    y = torch.nn.functional.linear(act * up, experts.down_proj[e])
                    out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
                return out

            experts.forward = forward

    L = hf["num_hidden_layers"]
    F = hf["intermediate_size"]

    def run(fn):
        def go():
            state["counts"] = [torch.zeros((hf["num_local_experts"], F) if moe else (F,), dtype=torch.long,
                                           device=dev) for _ in range(L)]
            with torch.inference_mode():
                for ids, mask in batches:
                    state["mask"] = mask.bool()
                    fn(input_ids=ids, attention_mask=mask)
            if dev == "cuda":
                torch.cuda.synchronize()
        return go

    return {"torch_hooks": run(model), "torch_hooks_no_head": run(model.model)}


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


READING = (
    "Reading the table: the plain forward runs exactly the batches `collect_counts` plans, so the "
    "overhead column is the counting plus collect's host work (moving the counts off the device into "
    "the N-row result). The transformers baseline (forward hooks on `act_fn` accumulating `(act > 0)` "
    "on the device; for the MoE the experts' loop patched to count per expert, LAPE-style) is timed as "
    "users call it, `model(input_ids, attention_mask)` with logits, and as the decoder stack alone "
    "(`model.model`, the stricter baseline); the speed-up column gives both. On CPU `collect_counts` "
    "also leaves out the last block's up and down products (they feed nothing when only counts are "
    "wanted; the plain forward computes them: about 6% of these 8-layer models' matmul FLOPs), and the "
    "MoE forward column is the differentiable tile "
    "scan (the training path) while counting uses the inference-only expert loop: both make the CPU "
    "overhead column read low, even negative. On GPU each MoE model has a second row with "
    "`moe_impl=ragged`: the default capacity-buffer path against XLA's `ragged_dot` on the same card. "
    "On a shared machine whole runs of one version can differ by several percent (on the 2-core CPU "
    "up to about 7%; best-of-N within a run does not remove slow drifts), so compare rows of one run."
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sequences and repeats (smoke run)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", choices=["small", "large", "all"], default=None,
                    help="small: the 33M Llama and MoE of the issue; large: ~1B dense and 2B MoE "
                         "(default: small on CPU, all on accelerators)")
    ap.add_argument("--n", type=int, default=None, help="sequences per model (default 64 on CPU, 512 otherwise)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 8 on CPU; 8 for small and "
                                                             "32 for large models otherwise)")
    ap.add_argument("--dtype", default=None, help="compute dtype (default float32 on CPU, bfloat16 otherwise)")
    ap.add_argument("--no-memory", action="store_true", help="skip the host-memory measurement")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--label", default=None, help="machine label for the table (default: detected)")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    on_cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    n = args.n or (16 if args.quick else (64 if on_cpu else 512))
    repeats = 1 if args.quick else args.repeats
    which = args.models or ("small" if on_cpu else "all")
    models = MODELS["large"] + MODELS["small"] if which == "all" else MODELS[which]
    seqs = make_sequences(n, 64, 256, 8000)
    peak_n = 2048 if on_cpu else 8192
    peak = matmul_peak_flops(peak_n, dtype=jnp.dtype(dtype))
    rows = []
    results = {}
    for name, hf in models:
        large = hf in (LLAMA_1B, MIXTRAL_2B)
        batch = args.batch or (32 if large and not on_cpu else 8)
        # Off CPU, MoE models are also timed with ragged_dot (the "auto" path there is the
        # capacity buffer on GPU, ragged_dot on TPU), to show what the choice is worth.
        impls = ["auto", "ragged"] if hf["model_type"] == "mixtral" and jax.default_backend() == "gpu" else ["auto"]
        runs, padding = {}, 0.0
        for impl in impls:
            cfg, padding, r = jax_runs(hf, seqs, batch, dtype, with_logits=not large, moe_impl=impl)
            runs.update({f"{k}@{impl}": v for k, v in r.items()})
        if not args.no_torch:
            runs.update(torch_runs(hf, seqs, batch, dtype))
        t = time_interleaved(runs, repeats)
        n_tok = sum(len(s) for s in seqs)
        tps = {k: n_tok / v for k, v in t.items()}
        flops = forward_flops(cfg, n_tok, with_head=False, counts_only=on_cpu)
        na = "n/a"
        torch_tps = (f"{tps['torch_hooks']:,.0f} / {tps['torch_hooks_no_head']:,.0f}"
                     if "torch_hooks" in tps else na)
        for impl in impls:
            c, f, lg = (f"{k}@{impl}" for k in ("collect", "forward_no_head", "forward_logits"))
            label = name if impl == "auto" else f"{name}, moe_impl={impl}"
            results[label] = dict(tokens=n_tok, batch=batch, padding=padding, flops_per_s=flops / t[c],
                                  tokens_per_s={k.split("@")[0]: v for k, v in tps.items()
                                                if k.endswith(f"@{impl}") or k.startswith("torch")})
            logits = f"{tps[lg]:,.0f}" if lg in tps else na
            speedup = (f"{tps[c] / tps['torch_hooks']:.2f}x / {tps[c] / tps['torch_hooks_no_head']:.2f}x"
                       if "torch_hooks" in tps else na)
            rows.append(
                f"| {label} | {n_tok} ({padding:.0%} padding), batch {batch} | {tps[c]:,.0f} | "
                f"{tps[f]:,.0f} | {logits} | {t[c] / t[f] - 1:+.1%} | "
                f"{torch_tps} | {speedup} | {flops / t[c] / 1e9:,.1f} ({flops / t[c] / peak:.0%}) |")
            print(rows[-1], flush=True)
    mem = {} if args.no_memory else bench_memory([64, 256, 1024] if not args.quick else [32, 128])
    label = args.label or device_name()
    body = [
        f"Machine: {label}; jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPU threads; "
        f"compute {dtype}; run {time.strftime('%Y-%m-%d')}; {n} random sequences of 64-256 tokens per model, "
        f"best of {repeats} after a warm-up (compilation excluded), the frameworks timed in alternation.",
        "",
        "| model | tokens | collect_counts tok/s | jitted forward, no LM head, tok/s | jitted forward with logits, tok/s "
        "| counting overhead vs forward (target <= +10%) | transformers + hooks tok/s: model() / decoder only "
        "| speed-up vs model() / vs decoder only (target: Llama >= 1.15x, MoE >= 1.5x) "
        "| achieved GFLOP/s of collect_counts (share of matmul peak) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Large-matmul peak on this machine: {peak / 1e9:,.1f} GFLOP/s ({dtype}, {peak_n}x{peak_n}x{peak_n}).",
        "",
        READING,
    ]
    if mem:
        body += [
            "",
            "Peak host memory of a store-mode collection vs number of instructions "
            "(8 layers x 2048 neurons, chunks of 64 rows):",
            "",
            "| instructions | peak RSS (MB) |",
            "|---|---|",
            *[f"| {k} | {v:,.0f} |" for k, v in mem.items()],
        ]
    replace_section(Path(args.out), f"collect:{label}", "\n".join(body),
                    title=f"Statistics engine — {label}")
    print("\n".join(body))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
