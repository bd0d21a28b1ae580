"""Benchmark fine-tuning throughput: training tokens/s and model FLOP utilisation (MFU).

    python scripts/bench_train.py                     # small Llama, this machine's default backend
    python scripts/bench_train.py --hidden 512 --layers 8 --steps 20 --no-write
    python scripts/bench_train.py --shape llama1b --batch 16 --seq 1024 --no-finetune   # accelerators

Two measurements, both on one Llama built from the shipped tokenizer's vocabulary:

1. The jitted train step alone on full-length random sequences (no padding), on a Llama
   of the shipped tokenizer's vocabulary (--hidden/--layers/--heads) or a shape of
   bench_common.SHAPES (--shape, e.g. llama1b):
   tokens/s and MFU = flops_per_token * tokens/s / peak, with
   flops_per_token = 6 * N + 12 * L * T * H * Dh (PaLM, appendix B: N is the
   matmul parameter count, i.e. without the embedding lookup table; the second
   term is attention's scores and weighted sum). `peak` is measured here: the
   best rate of a large jitted matmul in the compute dtype on the same device,
   so MFU is relative to what this machine actually reaches, not a datasheet.
2. `finetune` end to end on the shipped instruction records (length buckets,
   padding, host batching, metrics), as real (non-padding) tokens/s from its
   metrics file, after the compile steps (left out with --no-finetune: reading the
   shipped records needs the `datasets` package).

Target (issue 15): MFU >= 40% for the 1B Llama shape in bfloat16 on an accelerator.

Writes (or replaces) the section between ``<!-- train:MACHINE:start -->`` and
``<!-- train:MACHINE:end -->`` in docs/benchmarks.md; other sections are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import (  # noqa: E402
    device_name, met_word, peak_flops, replace_section, shape, stamp, target, update_results,
)

MFU_TARGET = 0.40


def flops_per_token(cfg, T: int) -> float:
    embed = cfg.vocab_size * cfg.hidden_size
    n_matmul = cfg.param_count() - embed if not cfg.tie_word_embeddings else cfg.param_count()
    return 6 * n_matmul + 12 * cfg.num_layers * T * cfg.num_heads * cfg.head_dim


def bench_step(model_cfg, args, dtype: str) -> dict:
    """Time the train step on full-length random sequences."""
    import jax

    from sparcom_jax.models.transformer import init_model
    from sparcom_jax.parallel.mesh import make_mesh
    from sparcom_jax.train import TrainConfig, make_optimizer
    from sparcom_jax.runtime import put_batch
    from sparcom_jax.train.step import compute_graphdef, init_state, make_shardings, make_train_step, pure_params

    cfg = TrainConfig(batch_size=args.batch, grad_accum=1, total_steps=1000, warmup_steps=10, compute_dtype=dtype,
                      max_length=args.seq)
    mesh = make_mesh()
    cfg.check_mesh(int(mesh.shape["data"]))
    tx, sched = make_optimizer(cfg, cfg.total_steps)
    sh = make_shardings(model_cfg, tx, mesh)
    state = init_state(pure_params(init_model(model_cfg, seed=0)), tx, sh)
    step = make_train_step(compute_graphdef(model_cfg, dtype), tx, sh, sched)
    rng = np.random.default_rng(0)
    shape = (1, args.batch, args.seq)
    ids = put_batch(rng.integers(3, model_cfg.vocab_size, shape).astype(np.int32), sh.batch_ABT, global_batch=True)
    mask = put_batch(np.ones(shape, bool), sh.batch_ABT, global_batch=True)
    tgt_np = np.ones(shape, bool)
    tgt_np[..., -1] = False
    tgt = put_batch(tgt_np, sh.batch_ABT, global_batch=True)
    t = time.perf_counter()
    state, m = step(state, ids, mask, tgt)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = step(state, ids, mask, tgt)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    tokens = args.batch * args.seq
    return {"step_s": med, "tokens_per_s": tokens / med, "compile_s": compile_s, "tokens_per_step": tokens}


def bench_finetune(model_cfg, args, dtype: str) -> dict:
    """End-to-end finetune on the shipped records with the default length buckets.

    Real (non-padding) tokens/s over the steps that did not compile: the first
    step of each bucket length compiles, and is reported separately.
    """
    from sparcom_jax.data import default_tokenizer, load_instructions
    from sparcom_jax.models.transformer import init_model
    from sparcom_jax.train import TrainConfig, finetune, read_metrics

    tok = default_tokenizer()
    cfg = TrainConfig(batch_size=args.batch, grad_accum=1, total_steps=args.ft_steps, warmup_steps=1,
                      compute_dtype=dtype, max_length=args.seq, save_every=10 ** 6, keep_last=1)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = finetune(init_model(model_cfg, seed=0), load_instructions(), tok, cfg, Path(d) / "run",
                       eval_records=load_instructions(n_per_category=1), progress=False)
        wall = time.perf_counter() - t
        rows = read_metrics(res.metrics_path)
    seen, timed = set(), []
    for r in rows:
        if r["slots"] in seen:
            timed.append(r)
        seen.add(r["slots"])
    tokens, slots = sum(r["tokens"] for r in timed), sum(r["slots"] for r in timed)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": tokens / seconds, "padding": 1 - tokens / slots, "shapes": len(seen),
            "steps": len(rows), "timed_steps": len(timed), "wall_s": wall,
            "all_tokens_per_s": sum(r["tokens"] for r in rows) / wall}


def _load_note(result: dict) -> str:
    la = result.get("load_average")
    if la is None or result.get("backend") != "cpu":
        return ""
    return (f"The machine was shared (1-minute load average {la:.1f} at the end of the run), so CPU numbers "
            "can vary by 2x between runs.\n")


def write_section(path: Path, body: str, device: str | None = None) -> None:
    """Replace this benchmark's section of `path` (one per machine with `device`), keeping the rest."""
    replace_section(Path(path), "train" if device is None else f"train:{device}", body)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed train steps on full-length sequences")
    p.add_argument("--ft-steps", type=int, default=40, help="finetune steps on the shipped records")
    p.add_argument("--dtype", default=None, help="compute dtype; default float32 on CPU, bfloat16 otherwise")
    p.add_argument("--shape", default=None, help="a shape of bench_common.SHAPES (e.g. llama1b) instead of "
                                                 "--hidden/--layers/--heads")
    p.add_argument("--tiny", action="store_true", help="with --shape: shrink it to toy size (CPU dry runs)")
    p.add_argument("--no-finetune", action="store_true", help="skip finetune on the shipped records (needs datasets)")
    p.add_argument("--peak-flops", type=float, default=None, help="matmul peak to use (default: measured here)")
    p.add_argument("--json", default=None, help="results JSON to update (key 'train')")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    import jax

    from sparcom_jax.models.config import ModelConfig
    from sparcom_jax.runtime import ensure_compilation_cache

    ensure_compilation_cache()  # as `finetune` does: the step's programs are cached too
    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    if args.shape:
        name, hf = shape(args.shape, args.tiny)
        hf["max_position_embeddings"] = max(hf["max_position_embeddings"], args.seq)
    else:
        from sparcom_jax.data import default_tokenizer

        hf = dict(model_type="llama", vocab_size=len(default_tokenizer()), hidden_size=args.hidden,
                  intermediate_size=int(args.hidden * 8 / 3) // 8 * 8, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  max_position_embeddings=max(args.seq, 512))
        name = None
    model_cfg = ModelConfig.from_hf_config(hf)
    peak = peak_flops(args.peak_flops, dtype)
    step = bench_step(model_cfg, args, dtype)
    fpt = flops_per_token(model_cfg, args.seq)
    mfu = fpt * step["tokens_per_s"] / peak
    ft = None if args.no_finetune else bench_finetune(model_cfg, args, dtype)
    c = model_cfg
    model = (f"{name}: " if name else "") + (f"llama D={c.hidden_size} L={c.num_layers} H={c.num_heads}/"
                                            f"{c.num_kv_heads} F={c.intermediate_size} V={c.vocab_size}")
    tgt = target(f"train step MFU, {model}, {dtype}", f"{mfu:.1%}", f">= {MFU_TARGET:.0%}", mfu >= MFU_TARGET)
    result = {"device": device_name(), "backend": jax.default_backend(), "dtype": dtype, "params": c.param_count(),
              "peak_tflops": peak / 1e12, "step": step, "mfu": mfu, "finetune": ft, "model": model,
              "batch": f"{args.batch} x {args.seq}", "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
              "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "targets": [tgt]}
    print(json.dumps(result, indent=2))
    update_results(args.json, "train", result)
    if not args.no_write:
        ft_rows = "" if ft is None else (
            f"| `finetune` on the shipped records, steps that did not compile | {ft['tokens_per_s']:,.0f} real "
            f"tokens/s ({ft['padding']:.0%} of slots are padding, {ft['shapes']} bucket shapes) |\n"
            f"| `finetune` wall clock, {ft['steps']} steps incl. compiles, evals, checkpoints | "
            f"{ft['all_tokens_per_s']:,.0f} real tokens/s ({ft['wall_s']:.0f} s) |\n")
        body = f"""{stamp()}.
Model: {model} ({result['params'] / 1e6:,.2f} M parameters), compute {dtype}, float32 master weights,
AdamW; batch {result['batch']} tokens, one device.

| measurement | value |
|---|---|
| train step, full-length sequences | {step['tokens_per_s']:,.0f} tokens/s ({step['step_s'] * 1e3:.0f} ms/step, first step incl. compile {step['compile_s']:.1f} s) |
| model FLOPs per token (6N + 12·L·T·H·Dh) | {fpt / 1e6:,.1f} MFLOP |
| measured peak ({dtype} matmul) | {peak / 1e9:,.1f} GFLOP/s |
| **MFU** (model FLOP/s ÷ measured peak) | **{mfu:.1%}** (target >= {MFU_TARGET:.0%} for the 1B shape in bfloat16 on an accelerator: **{met_word(tgt['met'])}**) |
{ft_rows}
{_load_note(result)}Re-run with `python scripts/bench_train.py` (options: `--shape --hidden --layers --batch --seq --dtype`); on a
GPU the default compute dtype is bfloat16 and the peak is a bfloat16 matmul. MFU here is relative to the matmul rate
this machine reaches, so it measures overheads (attention, norms, optimizer, dispatch), not the hardware's datasheet.
"""
        write_section(Path(args.out), f"## Training (`scripts/bench_train.py`) — {result['device']}\n\n{body}",
                      result["device"])
        print(f"wrote the train section of {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
