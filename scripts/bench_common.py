"""Shared helpers for the benchmark scripts: model shapes, the machine stamp, the matmul peak,
docs table sections, the results JSON and the targets each benchmark checks."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import time
from pathlib import Path

from sparcom_jax.fileio import atomic_write, write_json

HEADER = ("# Benchmarks\n\nWritten by the scripts in `scripts/bench_*.py`; each section is replaced when its "
          "script runs again on the same kind of machine. Numbers are from one run on the machine named.\n")

# The model shapes the benchmarks run, as HF config.json fields (random weights).
_LLAMA_COMMON = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
                     tie_word_embeddings=False)
SHAPES: dict[str, tuple[str, dict]] = {
    "llama33m": ("Llama 33M (8L, D512, F1536)", dict(
        _LLAMA_COMMON, vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)),
    "moe33m": ("Mixtral-style MoE (8L, D512, 8x768, top-2)", dict(
        model_type="mixtral", vocab_size=8000, hidden_size=512, intermediate_size=768, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512)),
    "llama1b": ("Llama 1B (16L, D2048, F5632, GQA 16/4)", dict(
        _LLAMA_COMMON, vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)),
    # OLMoE-1B-7B's published config, truncated to 4 of its 16 layers.
    "olmoe4": ("OLMoE shape, 4 layers (D2048, 64 x 1024, top-8, MHA 16/16)", dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, clip_qkv=None, attention_bias=False, tie_word_embeddings=False)),
    # Mixtral-8x7B's published config, truncated to 4 of its 32 layers.
    "mixtral4": ("Mixtral shape, 4 layers (D4096, 8 x 14336, top-2, GQA 32/8)", dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
        sliding_window=None, tie_word_embeddings=False)),
    "mixtral8x7b": ("Mixtral-8x7B (32L, D4096, 8 x 14336, top-2, GQA 32/8)", dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
        sliding_window=None, tie_word_embeddings=False)),
}
PRESETS = {"small": ["llama33m", "moe33m"], "gpu": ["llama1b", "olmoe4", "mixtral4"],
           "moe": ["olmoe4", "mixtral4"]}


def shrink(hf: dict) -> dict:
    """The same family and structure (GQA ratio, MoE routing) at toy size, for CPU dry runs.

    2 layers, width 64, 4 query heads with the original query/kv head ratio (at least one kv
    head), at most 8 experts and top-2, vocabulary 512 (special token ids inside it).
    """
    heads = 4
    kv = max(1, heads * hf["num_key_value_heads"] // hf["num_attention_heads"])
    out = dict(hf, num_hidden_layers=2, hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv,
               vocab_size=512, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=1)
    moe_key = next((k for k in ("num_local_experts", "num_experts") if k in hf), None)
    if moe_key:
        out.update({moe_key: min(8, hf[moe_key]), "num_experts_per_tok": min(2, hf["num_experts_per_tok"]),
                    "intermediate_size": 32})
    else:
        out["intermediate_size"] = 128
    return out


def shape(key: str, tiny: bool = False) -> tuple[str, dict]:
    """(table label, HF config dict) of SHAPES[key]; with `tiny`, shrunk and labelled so."""
    name, hf = SHAPES[key]
    return (f"{name} [tiny: 2L, D64]", shrink(hf)) if tiny else (name, dict(hf))


def make_sequences(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    """n random token sequences with lengths uniform in [lo, hi] (ids 3..vocab-1: no special ids)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(rng.integers(lo, hi + 1))).astype(np.int32) for _ in range(n)]


def on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"


def device_name() -> str:
    """A readable name for the machine the benchmark runs on (accelerator or CPU model)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.device_kind} ({dev.platform})"
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def versions() -> dict[str, str]:
    """Installed versions of the stack (read from package metadata: nothing heavy is imported)."""
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "transformers", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def stamp() -> str:
    """'Machine: <card>; jax .., flax .., transformers .., torch ..; run <date>' for every table."""
    import jax

    v = versions()
    return (f"Machine: {device_name()}; jax {v['jax']} ({jax.default_backend()}), flax {v['flax']}, "
            f"transformers {v['transformers']}, torch {v['torch']}; {os.cpu_count()} CPU threads; "
            f"run {time.strftime('%Y-%m-%d')}")


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype=None) -> float:
    """Achievable FLOP/s of one large jitted n x n x n matmul (the machine's practical ceiling).

    Random operands (zeros can run faster than real data); `dtype` defaults to float32.
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype or jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def peak_flops(given: float | None, dtype: str) -> float:
    """`given` (e.g. gpu_check's step 1 value, so every row shares one peak), else measured here."""
    if given:
        return float(given)
    import jax.numpy as jnp

    return matmul_peak_flops(2048 if on_cpu() else 8192, repeats=5 if on_cpu() else 10, dtype=jnp.dtype(dtype))


def accepts(fn, name: str) -> bool:
    """Whether `fn` takes a keyword `name` (feature check across library versions)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def moe_strategies() -> tuple[str, ...]:
    """The MoE dispatch strategies this version of the library offers (its own list)."""
    for mod in ("sparcom_jax.models.dispatch", "sparcom_jax.models.moe"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        names = getattr(m, "MOE_IMPLS", None) or getattr(m, "MOE_STRATEGIES", None)
        if names:
            return tuple(names)
    return ()


NOT_AVAILABLE = "not available in this version"


def replace_section(path: Path, key: str, body: str, title: str | None = None) -> None:
    """Replace (or append) the section between <!-- key:start --> and <!-- key:end --> atomically.

    With `title`, the section starts with a "## title" heading; otherwise `body` brings its own.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    heading = f"## {title}\n\n" if title else ""
    block = f"{start}\n{heading}{body.rstrip()}\n{end}"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write(path, text)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _json_safe(obj.item())
    return obj


def update_results(path: str | Path | None, key: str, value) -> None:
    """Set `key` in the results JSON at `path` (created if needed; others' keys kept), atomically."""
    if not path:
        return
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = _json_safe(value)
    write_json(path, data)


def target(name: str, value, goal: str, met: bool | None) -> dict:
    """One checked target: what, the measured value (as shown), the goal, met (None: not measured)."""
    return {"target": name, "value": value, "goal": goal, "met": met}


def met_word(met: bool | None) -> str:
    return {True: "MET", False: "NOT MET", None: "not measured"}[met]

