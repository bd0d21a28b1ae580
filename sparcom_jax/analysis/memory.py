"""Host memory of `analyze_model`, term by term, from the arrays each step allocates.

    est = analysis_bytes(1200, {"neuron_active": (32, 4096)}, n_boot=100, n_perm=999)
    est["peak"]            # bytes above what the caller held before the analysis

The dry run (`sparcom_jax.pipeline.plan`) prints it. Every term names the arrays of one
step, so a change there must change its term here (tests/test_analysis_memory.py holds
the estimate to the tracemalloc peak of a real analysis; scripts/bench_analysis_memory.py
measures it at study sizes, docs/benchmarks.md). The counts themselves are not included:
a count store is read a chunk at a time, and counts held in memory are the caller's.

Sizes: N instructions, u units of the field, B bootstrap replicates, C categories,
P permutations per product. An analysis goes through its fields one after another; each
field's steps run one after another too, so the peak is the largest step on top of what
the earlier fields and steps keep.
"""

from __future__ import annotations

import math
from typing import Mapping

from sparcom_jax.analysis.common import C
from sparcom_jax.analysis.evaluate import JACCARD_BLOCK_BYTES
from sparcom_jax.analysis.uncertainty import BOOT_BATCH_BYTES, PERM_BATCH

# Bytes per element of one chunk of rows [chunk, u] while identifying, at the chunk's start:
# its float32 frequencies and float32 tie-break strengths (twice while their pieces are
# joined), beside the last chunk's strengths and bool set, still bound; without strengths,
# select_units' float32 partition and two bool masks beside the frequencies and the last set.
_IDENTIFY_ROW_BYTES = {True: 4 + 4 + 4 + 4 + 1, False: 4 + 4 + 1 + 1 + 1}


def _block_means(n: int, b: int) -> int:
    """`category_block_means` with [b, n] weights: pair_terms' float64 values and validity
    [N, N], and float64 [B, N] weights, [B, N, C] weighted one-hots and two [B, C, N]
    einsum intermediates (b = 0: unweighted, the [N, N] pair alone)."""
    return 16 * n * n + (12 * b * n + 24 * b * n * C if b else 0)


def field_bytes(n: int, u: int, *, n_boot: int = 100, n_perm: int = 999, instruction_level: bool = True,
                groups: bool = True, pooled: bool = False, strength: bool = True, rules: int = 3,
                chunk: int = 64, packed: bool | None = None) -> dict[str, int]:
    """Peak bytes of each step of `analyze_field` on one field, and what it keeps.

    Args:
      n: instructions N; u: units of the field (its flattened unit shape).
      n_boot, n_perm, instruction_level: as analyze_field.
      groups: the counts carry group keys (the `between_groups` entry runs).
      pooled: the rule aggregates by pooled means (float64 bootstrap aggregates).
      strength: the rule breaks ties by strength (reads the activation sums; pooled,
        a second bootstrap aggregate).
      rules: rules identified in one pass (the rule, its contrast, ties kept).
      chunk: `IdentifyConfig.chunk`.
      packed: S(I) bit-packed (None: as analyze_field decides).

    Returns:
      dict of bytes: held (S(I) while analysing), identify, jaccard, bootstrap,
      permutation, between_groups (0 where the step does not run), peak (the largest
      step with what the steps before it keep) and kept (what the FieldAnalysis keeps).
    """
    from sparcom_jax.analysis.study import _PACK_ABOVE

    if packed is None:
        packed = n * u > _PACK_ABOVE
    need_sets = instruction_level or (n_boot > 0 and not pooled)
    sets = (n * -(-u // 8) if packed else n * u) if need_sets else 0
    jmat = 4 * n * n if instruction_level else 0
    # Each rule's Identification: bool category sets and float32 category means [C, u]
    # (made once the chunks are read).
    idents = rules * 5 * C * u
    rows = min(chunk, n)
    # Per rule an int64 [C, u] vote count, and the float64 [C, u] frequency sum.
    identify = sets + _IDENTIFY_ROW_BYTES[strength] * rows * u + 8 * C * u * (rules + 1)
    jaccard = 0
    if instruction_level:
        b = min(n, max(1, JACCARD_BLOCK_BYTES // (4 * max(u, 1))))
        # float32 rows of one block (two blocks when N does not fit in one: xi, xj) beside the
        # float32 [N, N] result, and per block pair the intersections, unions, NaN-filled
        # quotients (float32 while |A| + |B| < 2**24, else float64) and the union != 0 mask.
        pair = 3 * (4 if 2 * u < 1 << 24 else 8) + 1
        jaccard = idents + sets + 4 * u * b * (1 if b >= n else 2) + jmat + pair * b * b
    boot_keep = 0
    boot = 0
    if n_boot > 0:
        item, n_agg = (8, 1 + strength) if pooled else (4, 1)
        batch = min(n_boot, max(1, BOOT_BATCH_BYTES // (item * n_agg * C * max(u, 1))))
        # The float32 [B, N] draws and every replicate's bit-packed sets (kept for a paired comparison).
        boot_keep = 4 * n_boot * n + n_boot * C * -(-u // 8)
        agg = item * n_agg * batch * C * u
        # A chunk's rows: float32 S(I) (consensus), or float32 frequencies, their float64 exact
        # copy and float32 strengths (pooled; not measured in tests/test_analysis_memory.py).
        chunk_rows = (4 if not pooled else 4 + 8 + 4 * strength) * rows * u
        summing = chunk_rows + item * batch * u  # and a [batch, u] product per category
        # The aggregates go after their batch; the last chunk's rows stay (a loop variable).
        boot = idents + sets + jmat + boot_keep + max(
            agg + summing, chunk_rows + (_block_means(n, n_boot) if instruction_level else 0))
    held = idents + sets + jmat + boot_keep
    perm = 0
    p = min(PERM_BATCH, n_perm)
    # The float64 values and validity of every pair, a [N, P, C] float64 one-hot of a batch
    # of shuffles and its product with the pairs.
    shuffles = 16 * n * n + 16 * n * p * C if n_perm > 0 else 0
    if instruction_level and n_perm > 0:
        perm = held + shuffles
    between = 0
    if instruction_level and groups:
        # A float32 copy of the matrix with its within-group pairs NaN and the bool [N, N]
        # same-group mask; pair_terms' float64 values and bool and float64 validity.
        between = held + 5 * n * n + max(17 * n * n, shuffles, _block_means(n, n_boot) if n_boot else 0)
    steps = {"identify": identify, "jaccard": jaccard, "bootstrap": boot, "permutation": perm,
             "between_groups": between}
    return {"held": sets, **steps, "peak": max(steps.values()), "kept": idents + jmat + boot_keep}


def analysis_bytes(n: int, unit_shapes: Mapping[str, tuple[int, ...]], *, models: int = 1,
                   instruction_level: bool | list[str] = True, **field_kw) -> dict:
    """Peak host bytes of `analyze_model` on every field (in the given order), and of
    `models` such analyses one after another when each keeps its results (the pipeline's
    analyze_all).

    Args:
      n: instructions N.
      unit_shapes: {field: unit shape}, in the order analyze_model takes them.
      models: analyses held together (the last one's peak on top of the others' kept).
      instruction_level: as analyze_model.
      **field_kw: `field_bytes` options.

    Returns:
      {"fields": {field: field_bytes dict}, "peak": one model's peak, "kept": what one
      model's analysis keeps, "peak_all": the peak with `models` analyses}.
    """
    fields, kept, peak = {}, 0, 0
    for f, shape in unit_shapes.items():
        inst = instruction_level if isinstance(instruction_level, bool) else f in instruction_level
        fb = field_bytes(n, math.prod(shape), instruction_level=inst, **field_kw)
        fields[f] = fb
        peak = max(peak, kept + fb["peak"])
        kept += fb["kept"]
    return {"fields": fields, "peak": peak, "kept": kept, "peak_all": (models - 1) * kept + peak}
