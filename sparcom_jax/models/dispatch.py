"""How a model's forward maps onto the backend, decided once when the model is built.

The attention kernel, the MoE strategies (see `sparcom_jax.models.moe`), the count
reducer, whether a counts-only forward skips dead work, and the measured tile sizes are
fixed here from the requested ``moe_impl`` and ``attention``, the compute dtype and
`jax.default_backend()` at construction, never at trace time: the model's repr and the
count store's metadata say what ran.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp

MOE_IMPLS = ("auto", "ragged", "grouped", "capacity", "tiled", "looped")
ATTENTION_IMPLS = ("auto", "blocked", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The forward's backend-dependent choices and measured constants.

    Attributes:
      impl: the requested ``moe_impl`` ("auto" or a strategy).
      grouped_dot: the grouped matmul of the "grouped" strategy: "tokamax" (its Pallas
        Mosaic-GPU `ragged_dot` on Hopper GPUs, megablox-style kernels on TPU; tokamax
        picks the first of its kernels that takes the shapes and dtypes) when the package
        is importable, else "lax" (`jax.lax.ragged_dot`, the same API).
      attention: the attention kernel. "blocked": our causal attention in query blocks
        with every product at the model's precision (`sparcom_jax.models.layers.attend`;
        measured faster on CPU, and the one float32 path: full float32 on every backend).
        "cudnn": `jax.nn.dot_product_attention`'s cuDNN flash attention (GPU, bfloat16 or
        float16 only, head width a multiple of 8 up to 128). "xla": the same call with
        XLA's implementation (the cuDNN path's reference on CPU; at the backend's default
        precision, so refused for float32 models off the CPU).
      moe_counting: MoE strategy of counting forwards ("ragged", "capacity", "tiled" or
        "looped"); moe_forward: of every other forward (needs a reverse-mode gradient
        unless forced to "looped").
      count_method: the count reducer's method, "segment" (sorted segment sums, cheapest
        on CPU) or "matmul" (one-hot batched matmuls, as accelerators prefer).
      skip_dead_ffn: counts-only forwards leave out the last block's up and down
        products through a conditional (CPU, where measured; GPU conditionals may
        synchronise with the host, so there the products just run).
      capacity_factors: per-expert capacities of "capacity", as multiples of the mean
        group size M/E; the smallest that holds the largest group runs, past the last
        `ragged_dot`. Trained routers are uneven per batch (fine-grained MoEs such as
        OLMoE or Qwen3-MoE more so), hence the 4x branch: a 4M-row buffer still beats a
        `ragged_dot` rewritten into a dense product over all E experts.
      scan_tile: largest tile of "tiled" (measured best on a 2-core CPU).
      loop_tile, loop_tail: full and tail tiles of "looped" (at most loop_tail - 1
        padding rows per expert); loop_tile must be a multiple of loop_tail.
      attn_block, attn_max_blocks: causal attention runs in query blocks of about
        attn_block rows, each against only the keys up to its last row, in at most
        attn_max_blocks blocks (on CPU 1.4-2.8x faster attention for 100-1024 tokens).
    """

    impl: str
    moe_counting: str
    moe_forward: str
    count_method: str
    skip_dead_ffn: bool
    attention: str = "blocked"
    backend: str = "cpu"
    grouped_dot: str = "lax"
    capacity_factors: tuple[float, ...] = (1.25, 2.0, 4.0)
    scan_tile: int = 64
    loop_tile: int = 256
    loop_tail: int = 16
    attn_block: int = 96
    attn_max_blocks: int = 8

    @classmethod
    def choose(cls, moe_impl: str = "auto", backend: str | None = None, *, attention: str = "auto",
               dtype="float32", head_dim: int | None = None, **tuning) -> "Dispatch":
        """Resolve `moe_impl` and `attention` for `backend` (default: `jax.default_backend()`).

        MoE "auto": on CPU the expert loop when counting and the differentiable tile scan
        otherwise; on GPU the capacity buffer (measured 2.5x faster than XLA's ragged_dot
        on an H200; "grouped", tokamax's kernel, stays opt-in until the card measures it
        faster); on TPU (and anything else) ragged_dot. Any other strategy name is used
        for every forward. Attention "auto": cuDNN on GPU for bfloat16/float16 compute
        when `head_dim` (None: not checked) suits it, else "blocked". `tuning` overrides
        the measured constants (field names of this class).

        Raises:
          ValueError: for an unknown strategy or kernel, inconsistent tile sizes, or an
            attention kernel the compute `dtype` cannot use on `backend`.
        """
        if moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl {moe_impl!r} is not one of {MOE_IMPLS}")
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention {attention!r} is not one of {ATTENTION_IMPLS}")
        backend = backend or jax.default_backend()
        cpu = backend == "cpu"
        if moe_impl == "auto":
            counting, forward = ("looped", "tiled") if cpu else ("capacity",) * 2 if backend == "gpu" else ("ragged",) * 2
        else:
            counting = forward = moe_impl
        if attention == "auto":
            half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            fits = head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)
            attention = "cudnn" if backend == "gpu" and half and fits else "blocked"
        d = cls(moe_impl, counting, forward, "segment" if cpu else "matmul", cpu, attention, backend,
                _grouped_dot() if "grouped" in (counting, forward) else "lax", **tuning)
        if d.loop_tile % d.loop_tail:
            raise ValueError(f"loop_tile ({d.loop_tile}) must be a multiple of loop_tail ({d.loop_tail})")
        d.check(dtype)
        return dataclasses.replace(d, capacity_factors=tuple(float(f) for f in d.capacity_factors))

    def check(self, dtype) -> None:
        """Refuse an attention kernel that cannot compute in `dtype` on this backend.

        Raises:
          ValueError: cuDNN with float32 compute (it has no float32 path), or XLA's
            attention with float32 compute off the CPU (its products run at the backend's
            default precision: TF32 on GPUs).
        """
        f32 = jnp.dtype(dtype) == jnp.float32
        if f32 and self.attention == "cudnn":
            raise ValueError("attention='cudnn' has no float32 path; compute in bfloat16 or use attention='blocked'")
        if f32 and self.attention == "xla" and self.backend != "cpu":
            raise ValueError(f"attention='xla' would compute float32 attention at the {self.backend}'s default "
                             "precision (TF32 on GPUs); use attention='blocked' (full float32)")

    def __str__(self) -> str:
        def name(strategy):
            return f"grouped ({self.grouped_dot})" if strategy == "grouped" else strategy

        moe = (name(self.moe_counting) if self.moe_counting == self.moe_forward
               else f"{name(self.moe_counting)} when counting, {name(self.moe_forward)} otherwise")
        return f"moe {moe}; {self.count_method} counts"

    def ragged_dot(self):
        """The grouped matmul of "grouped" (`grouped_dot`), with `jax.lax.ragged_dot`'s API."""
        return importlib.import_module("tokamax").ragged_dot if self.grouped_dot == "tokamax" else jax.lax.ragged_dot


def _grouped_dot() -> str:
    try:
        importlib.import_module("tokamax")
    except ImportError:
        return "lax"
    return "tokamax"


def dispatch_for(moe_impl: "str | Dispatch", dtype, head_dim: int) -> Dispatch:
    """The `Dispatch` of a model computing in `dtype`: `moe_impl` itself when it is one
    (checked against `dtype`), else `Dispatch.choose` for this backend."""
    if isinstance(moe_impl, Dispatch):
        moe_impl.check(dtype)
        return moe_impl
    return Dispatch.choose(moe_impl, dtype=dtype, head_dim=head_dim)
