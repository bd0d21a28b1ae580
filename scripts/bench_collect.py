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

Usage: python scripts/bench_collect.py [--quick] [--out docs/benchmarks.md]
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


def make_sequences(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(rng.integers(lo, hi + 1))).astype(np.int32) for _ in range(n)]


def forward_flops(cfg, n_tokens: int, with_head: bool) -> float:
    """2 * (active params touched per token) * tokens (matmuls only; attention scores ignored)."""
    D, L = cfg.hidden_size, cfg.num_layers
    attn = D * cfg.q_width + 2 * D * cfg.kv_width + cfg.q_width * D
    ffn = (cfg.top_k * 3 * D * cfg.moe_intermediate_size + D * cfg.num_experts) if cfg.is_moe \
        else 3 * D * cfg.intermediate_size
    per_tok = L * (attn + ffn) + (D * cfg.vocab_size if with_head else 0)
    return 2.0 * per_tok * n_tokens


def time_best(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_jax(hf: dict, seqs, batch_size: int, repeats: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import sparcom_jax as sj
    from sparcom_jax.data.batching import default_buckets, pad_batch, plan_batches
    from sparcom_jax.stats.runner import BUCKETS_PER_OCTAVE

    cfg = sj.ModelConfig.from_hf_config(hf)
    model = sj.init_model(cfg, seed=0)
    n_tok = sum(len(s) for s in seqs)

    def collect():
        sj.collect_counts(model, seqs, batch_size=batch_size, progress=False)

    # The plain forward runs exactly the batches collect_counts plans, so the
    # difference is the counting itself (plus collect's host-side work).
    lengths = [len(s) for s in seqs]
    plan = plan_batches(lengths, batch_size, default_buckets(max(lengths), steps_per_octave=BUCKETS_PER_OCTAVE),
                        pad_rows=True, group="sorted")
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

    t_collect = time_best(collect, repeats)
    t_hidden = time_best(run(fwd_hidden), repeats)
    t_logits = time_best(run(fwd_logits), repeats)
    return cfg, n_tok, plan.padding_fraction, {"collect": t_collect, "forward_no_head": t_hidden,
                                               "forward_logits": t_logits}


def bench_torch(hf: dict, seqs, batch_size: int, repeats: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = AutoConfig.for_model(**hf)
    model = AutoModelForCausalLM.from_config(cfg).eval()
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
        batches.append((ids, mask))
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
                    out.index_add_(0, tok, y * top_k_weights[tok, pos, None])
                return out

            experts.forward = forward

    L = hf["num_hidden_layers"]
    F = hf["intermediate_size"]

    def go():
        state["counts"] = [torch.zeros((hf["num_local_experts"], F) if moe else (F,), dtype=torch.long)
                           for _ in range(L)]
        with torch.inference_mode():
            for ids, mask in batches:
                state["mask"] = mask.bool()
                model.model(input_ids=ids, attention_mask=mask)  # no LM head: counts only

    return time_best(go, repeats)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sequences and repeats (smoke run)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default=None, help="machine label for the table (default: detected)")
    args = ap.parse_args()
    n = 16 if args.quick else 64
    repeats = 1 if args.quick else args.repeats
    seqs = make_sequences(n, 64, 256, 8000)
    import jax

    peak = matmul_peak_flops()
    rows = []
    results = {}
    for name, hf in (("Llama 33M (8L, D512, F1536)", LLAMA), ("Mixtral-style MoE (8L, D512, 8x768, top-2)", MIXTRAL)):
        cfg, n_tok, padding, t = bench_jax(hf, seqs, 8, repeats)
        t_torch = bench_torch(hf, seqs, 8, repeats)
        tps = {k: n_tok / v for k, v in t.items()}
        tps["torch_hooks"] = n_tok / t_torch
        flops = forward_flops(cfg, n_tok, with_head=False)
        results[name] = dict(tokens=n_tok, tokens_per_s=tps, flops_per_s=flops / t["collect"], padding=padding)
        rows.append(
            f"| {name} | {n_tok} ({padding:.0%} padding) | {tps['collect']:,.0f} | {tps['forward_no_head']:,.0f} | "
            f"{tps['forward_logits']:,.0f} | {t['collect'] / t['forward_no_head'] - 1:+.1%} | "
            f"{tps['torch_hooks']:,.0f} | {tps['collect'] / tps['torch_hooks']:.2f}x | "
            f"{flops / t['collect'] / 1e9:,.1f} ({flops / t['collect'] / peak:.0%}) |")
    mem = bench_memory([64, 256, 1024] if not args.quick else [32, 128])
    label = args.label or device_name()
    body = [
        f"Machine: {label}; jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPU threads; "
        f"run {time.strftime('%Y-%m-%d')}; {n} random sequences of 64-256 tokens, batches of 8, "
        f"best of {repeats} after a warm-up (compilation excluded).",
        "",
        "| model | tokens | collect_counts tok/s | jitted forward, no LM head, tok/s | jitted forward with logits, tok/s "
        "| counting overhead vs forward (target <= +10%) | transformers + hooks tok/s | speed-up (target: Llama >= 1.15x, MoE >= 1.5x) "
        "| achieved GFLOP/s (share of matmul peak) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Large-matmul peak on this machine: {peak / 1e9:,.1f} GFLOP/s (float32, 2048x2048x2048).",
        "",
        "Reading the table: the plain forward runs exactly the batches `collect_counts` plans "
        "(length-sorted, padded to a 4-per-octave bucket ladder), so the overhead column is the cost of "
        "counting plus collect's host-side work. For the MoE the plain forward uses the differentiable "
        "tile scan (the training path) while counting uses the inference-only expert loop, hence a "
        "negative overhead. The baseline is transformers with oneDNN kernels, including a fused causal "
        "SDPA; on a 2-core CPU both reach a similar share of the matmul ceiling, so the speed-up targets "
        "(1.15x dense, 1.5x MoE) are not reached here: attention is ~28% of our dense forward and "
        "the expert matmuls run on small per-expert tiles. On GPU/TPU the MoE path is `ragged_dot`.",
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
