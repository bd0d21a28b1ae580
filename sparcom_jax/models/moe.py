"""Mixture-of-Experts FFN: top-k routing, one expert body, a dispatch strategy fixed at construction.

Axis letters: see `sparcom_jax.axes` (``X`` flattened tokens, ``M`` token-expert
assignments, ``C`` per-expert capacity).

Routing follows the reference exactly: router logits in the compute dtype, softmax
over all experts in float32, top-k, optional renormalisation of the chosen k
weights. Assignments are sorted by (expert, sequence), so every expert sees one
contiguous group of rows. Every strategy runs the same body, `expert_mlp`, on each
expert's rows and returns the rows' activations, which the one count reducer,
`expert_neuron_counts`, turns into per-(sequence, expert) counts and sums. The
strategies differ only in how rows reach the body; which one runs is fixed by
`sparcom_jax.models.dispatch.Dispatch` when the model is built:

- "looped" (CPU, counting): a loop over experts and their tiles; fastest on CPU,
  no reverse-mode gradient.
- "tiled" (CPU, training): a differentiable scan over expert-pure tiles; several
  times faster than ragged_dot, which XLA's CPU backend lowers densely.
- "capacity" (GPU): batched matmuls over a per-expert capacity buffer with an exact
  ragged_dot fallback; ragged_dot may be rewritten into a dense product over all
  experts there (docs/benchmarks.md: 2.5x slower on an H200).
- "ragged" (TPU): `jax.lax.ragged_dot`, lowered to grouped matmuls.
- "grouped" (GPU, opt-in): the same grouped matmuls through tokamax's Pallas kernels
  (`tokamax.ragged_dot`, the same API) when tokamax is installed, else exactly "ragged".
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from sparcom_jax.models.config import ModelConfig
from sparcom_jax.models.dispatch import Dispatch
from sparcom_jax.models.layers import GatedFFN, activation, expert_mlp, precision_of
from sparcom_jax.models.params import HFLayout, ParamDecl, create, linear


def route(logits_XE, k: int, norm_topk_prob: bool, drop_E=None, drop_pre=None):
    """Top-k routing, optionally with experts removed.

    Args:
      logits_XE: router logits.
      k: experts per token.
      norm_topk_prob: renormalise the chosen k weights to sum to 1 (the model's own rule).
      drop_E: bool [E], True = expert removed (ablation), or None.
      drop_pre: bool scalar (may be traced). False or None (default, post-softmax): the
        removed experts' probabilities are zeroed and the top-k taken from the rest,
        with no renormalisation beyond `norm_topk_prob`, so tokens that did not use a
        removed expert keep their weights. True (pre-softmax): the removed experts
        leave the softmax, which renormalises every token's weights over the smaller
        pool. With `norm_topk_prob` the two coincide.

    Returns:
      weights [X, k] float32, experts [X, k] int32, probs [X, k] float32 (the softmax
      probability of each chosen expert, before any renormalisation) and full [X, E]
      float32 (every expert's softmax probability before any is removed: the removed
      experts' sum is the routing mass the ablation dropped).
    """
    logits = logits_XE.astype(jnp.float32)
    full = probs = jax.nn.softmax(logits, axis=-1)
    if drop_E is not None:
        if drop_pre is not None:
            probs = jnp.where(drop_pre, jax.nn.softmax(jnp.where(drop_E, -jnp.inf, logits), axis=-1), probs)
        probs = jnp.where(drop_E, 0.0, probs)
    p, idx = jax.lax.top_k(probs, k)
    w = p / jnp.sum(p, axis=-1, keepdims=True) if norm_topk_prob else p
    return w, idx.astype(jnp.int32), p, full


def data_shards(rows: int) -> int:
    """How many data shards a traced [rows, ...] batch is split into: the "data" axis of the
    mesh the program is traced under (`sparcom_jax.parallel.sharding.with_mesh`), or 1
    without one or when the axis does not divide `rows` (then the rows are not split, and
    a warning says so once per (rows, axis size))."""
    mesh = jax.sharding.get_abstract_mesh()
    n = 1 if mesh.empty or "data" not in mesh.axis_names else int(mesh.shape["data"])
    if rows % n == 0:
        return n
    _warn_unsplit(rows, n)
    return 1


_UNSPLIT_WARNED: set[tuple[int, int]] = set()


def _warn_unsplit(rows: int, n: int) -> None:
    """Warn (once per shape, not once per MoE layer or retrace) that a batch of `rows` rows
    is not split over a data axis of `n`: correct, but every device does the whole batch's
    routed-expert work."""
    if (rows, n) in _UNSPLIT_WARNED:
        return
    _UNSPLIT_WARNED.add((rows, n))
    warnings.warn(
        f"MoE layer: a batch of {rows} rows on a mesh whose 'data' axis has {n} devices: {n} does not "
        f"divide {rows}, so the rows are not split over the data axis and every device routes and "
        f"computes the whole batch's experts (correct, but up to {n}x slower); pad the batch to a "
        f"multiple of {n} rows (e.g. {-(-rows // n) * n}) with rows whose valid mask is False",
        stacklevel=2)


def group_layout(e_sorted_M, group_sizes_E, tile: int):
    """Place expert-sorted rows in a buffer where each expert's group starts on a `tile` boundary.

    Returns (padded [E], starts [E], pos [M]): each group's size rounded up to a
    multiple of `tile`, where each group starts in the buffer, and the buffer row of
    each sorted row. The groups fill at most M + E*(tile-1) rows, a static bound.
    """
    M = e_sorted_M.shape[0]
    padded = (group_sizes_E + tile - 1) // tile * tile
    starts = jnp.cumsum(padded) - padded
    rank = jnp.arange(M, dtype=jnp.int32) - (jnp.cumsum(group_sizes_E) - group_sizes_E)[e_sorted_M]
    return padded, starts, starts[e_sorted_M] + rank


def expert_neuron_counts(values_MG, seg_sorted_M, inv_M, e_Nk, B: int, E: int, method: str,
                         precision=None):
    """The count reducer: per-(sequence, expert) sums [B, E, G] of expert-sorted rows.

    Bool rows give int32 counts; float rows (activation sums) float32 sums.
    "segment": a sorted segment sum over (expert, sequence) segments (cheapest on CPU).
    "matmul": back in token order, a one-hot [E, T*k] x [T*k, G] product per sequence,
    a plain batched matmul on GPU/TPU, where a scatter-add over B*E segments is slow;
    0/1 counts are exact in bfloat16 operands with float32 sums (far below 2**24).
    """
    G = values_MG.shape[-1]
    counting = values_MG.dtype == jnp.bool_
    if method == "segment":
        out = jax.ops.segment_sum(values_MG.astype(jnp.int32 if counting else jnp.float32), seg_sorted_M,
                                  num_segments=E * B, indices_are_sorted=True)
        return out.reshape(E, B, G).transpose(1, 0, 2)
    if method != "matmul":
        raise ValueError(f"unknown count method {method!r}")
    dt = jnp.bfloat16 if counting else jnp.float32
    vals_BMG = values_MG[inv_M].reshape(B, -1, G).astype(dt)
    onehot_BME = jax.nn.one_hot(e_Nk.reshape(B, -1), E, dtype=dt)
    out = jnp.einsum("BME,BMG->BEG", onehot_BME, vals_BMG, preferred_element_type=jnp.float32,
                     precision=precision)
    return out.astype(jnp.int32) if counting else out


def _expert_in(name: str, part: int) -> tuple[HFLayout, ...]:
    """Our [E, D, G] gate or up projection: per-expert torch Linears [G, D], or block `part`
    of the fused ``experts.gate_up_proj`` [E, 2G, D] (or its transpose [E, D, 2G])."""
    return (HFLayout(f"experts.{{e}}.{name}.weight", ((2,), (1,)), split=0),
            HFLayout("experts.gate_up_proj", ((0,), (2,), (1,)), part=(1, part, 2)),
            HFLayout("experts.gate_up_proj", ((0,), (1,), (2,)), part=(2, part, 2)))


class MoEFFN(nnx.Module):
    """Routed experts, plus a sigmoid-gated shared expert when the config has one (Qwen-MoE)."""

    PARAMS = {
        # The router's expert axis stays whole on every device: each token's top-k needs all logits.
        "router": ParamDecl(("embed", "route"), (linear("gate.weight"),)),
        "gate_proj": ParamDecl(("experts", "embed", "expert_mlp"), _expert_in("gate_proj", 0)),
        "up_proj": ParamDecl(("experts", "embed", "expert_mlp"), _expert_in("up_proj", 1)),
        "down_proj": ParamDecl(("experts", "expert_mlp", "embed"), (
            HFLayout("experts.{e}.down_proj.weight", ((2,), (1,)), split=0),
            HFLayout("experts.down_proj", ((0,), (2,), (1,))),  # fused [E, D, G]
            HFLayout("experts.down_proj", ((0,), (1,), (2,))))),  # fused, transposed [E, G, D]
        "shared_expert_gate": ParamDecl(("embed", "unit"), (linear("shared_expert_gate.weight"),)),
    }
    CHILDREN = {"shared_expert": ("shared_expert", GatedFFN)}

    def __init__(self, cfg: ModelConfig, dispatch: Dispatch, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, gate_dtype=None):
        D, E, G = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        sizes = {"embed": D, "route": E, "experts": E, "expert_mlp": G, "unit": 1}
        create(self, ["router", "gate_proj", "up_proj", "down_proj"], rngs, sizes, param_dtype)
        if cfg.has_shared_expert:
            self.shared_expert = GatedFFN(D, cfg.shared_expert_intermediate_size, cfg.hidden_act, rngs=rngs,
                                          dtype=dtype, param_dtype=param_dtype, gate_dtype=gate_dtype)
            create(self, ["shared_expert_gate"], rngs, sizes, param_dtype)
        self.has_shared = cfg.has_shared_expert
        self.top_k = cfg.top_k
        self.norm_topk_prob = cfg.norm_topk_prob
        self.act = cfg.hidden_act
        self.dtype = dtype
        self.gate_dtype = gate_dtype  # None: the gates compute in `dtype` (see `expert_mlp`)
        self.precision = precision_of(dtype)
        self.dispatch = dispatch

    @property
    def impl(self) -> str:
        """The requested dispatch ("auto" or a strategy name); `dispatch` says what runs."""
        return self.dispatch.impl

    def _weights(self, index=None):
        """(gate, up, down) weights in their compute dtypes; of expert `index` (traced) only if given."""
        def get(w, dtype):
            w = w[...] if index is None else jax.lax.dynamic_index_in_dim(w[...], index, keepdims=False)
            return w.astype(dtype)

        return (get(self.gate_proj, self.gate_dtype or self.dtype), get(self.up_proj, self.dtype),
                get(self.down_proj, self.dtype))

    def _body(self, dot, keep=None, with_out=True):
        return functools.partial(expert_mlp, act=activation(self.act), dot=dot, keep=keep, with_out=with_out,
                                 gate_dtype=self.gate_dtype)

    # ---- strategies: (xs [M, D] expert-sorted, ...) -> (y [M, D], activations [M, G] or None)
    def _ragged(self, xs_MD, e_sorted, group_sizes, keep_EG, counting, ragged_dot=jax.lax.ragged_dot):
        """`jax.lax.ragged_dot` grouped matmuls: TPU (grouped GEMMs) and the capacity fallback."""
        def dot(x, w, precision=self.precision):
            return ragged_dot(x, w, group_sizes, precision=precision)

        keep = None if keep_EG is None else keep_EG.astype(self.dtype)[e_sorted]
        y_MD, a_MG = self._body(dot, keep)(xs_MD, *self._weights())
        return y_MD, a_MG if counting else None

    def _grouped(self, xs_MD, e_sorted, group_sizes, keep_EG, counting):
        """GPU: tokamax's grouped-matmul kernels (`Dispatch.grouped_dot`); on an H200 XLA
        rewrote `ragged_dot` into a dense product over all experts (docs/benchmarks.md)."""
        return self._ragged(xs_MD, e_sorted, group_sizes, keep_EG, counting, self.dispatch.ragged_dot())

    def _capacity(self, xs_MD, e_sorted, group_sizes, keep_EG, counting):
        """GPU: batched matmuls over an [E, C, D] buffer (ragged_dot ran 2.5x slower on an H200).

        Expert e's rows (contiguous after the sort) fill the first group_size[e] slots
        of its C-row slab (plain batched matmuls, what GPUs do best). C is chosen at run
        time from a few compiled capacities: the smallest that holds the largest group.
        If none does, the layer falls back to `ragged_dot`, so no token is ever dropped
        and the result is exactly that of the other strategies.
        """
        M, D = xs_MD.shape
        E = group_sizes.shape[0]
        starts = jnp.cumsum(group_sizes) - group_sizes
        rank = jnp.arange(M, dtype=jnp.int32) - starts[e_sorted]
        keep = None if keep_EG is None else keep_EG.astype(self.dtype)[:, None, :]
        body = self._body(functools.partial(jnp.matmul, precision=self.precision), keep)

        def with_capacity(C):
            def run(xs_MD):
                c = jnp.arange(C, dtype=jnp.int32)
                valid_EC = c[None, :] < group_sizes[:, None]
                x_ECD = jnp.where(valid_EC[..., None], xs_MD[jnp.minimum(starts[:, None] + c, M - 1)], 0)
                y_ECD, a_ECG = body(x_ECD, *self._weights())
                slot = e_sorted * C + jnp.minimum(rank, C - 1)
                return y_ECD.reshape(E * C, D)[slot], a_ECG.reshape(E * C, -1)[slot] if counting else None
            return run

        def ragged(xs_MD):
            return self._ragged(xs_MD, e_sorted, group_sizes, keep_EG, counting)

        caps = sorted({min(M, -(-int(np.ceil(f * M / E)) // 8) * 8) for f in self.dispatch.capacity_factors})
        branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), jnp.max(group_sizes))
        return jax.lax.switch(branch, [with_capacity(C) for C in caps] + [ragged], xs_MD)

    def _tiled(self, xs_MD, e_sorted, group_sizes, keep_EG, counting):
        """CPU training: a differentiable scan over expert-pure tiles (ragged_dot is dense on CPU).

        Each group is padded to a multiple of the tile size `tb` (a power of two near
        the mean group, at most `scan_tile`), so the buffer has a static bound of
        M + E*(tb-1) rows. Several times faster on CPU than `ragged_dot`.
        """
        M, D = xs_MD.shape
        E = group_sizes.shape[0]
        tb = int(min(self.dispatch.scan_tile, max(8, 2 ** int(np.log2(max(M // E, 1))))))
        padded, starts, pos = group_layout(e_sorted, group_sizes, tb)
        n_tiles = (M + E * (tb - 1)) // tb + 1
        tile_e = jnp.minimum(jnp.searchsorted(starts + padded, jnp.arange(n_tiles) * tb, side="right"), E - 1)
        x_tiles = jnp.zeros((n_tiles * tb, D), self.dtype).at[pos].set(xs_MD).reshape(n_tiles, tb, D)
        wg, wu, wd = self._weights()
        keep = None if keep_EG is None else keep_EG.astype(self.dtype)
        dot = functools.partial(jnp.matmul, precision=self.precision)

        def tile(_, inp):
            x_tD, e = inp
            y_tD, a_tG = self._body(dot, None if keep is None else keep[e])(x_tD, wg[e], wu[e], wd[e])
            return None, (y_tD, a_tG if counting else None)

        _, (y, a) = jax.lax.scan(tile, None, (x_tiles, tile_e))
        return y.reshape(n_tiles * tb, D)[pos], a.reshape(n_tiles * tb, -1)[pos] if counting else None

    def _looped(self, xs_MD, e_sorted, group_sizes, keep_EG, counting, real_M, out_needed):
        """CPU counting: a loop over experts and their tiles (fastest on CPU; no gradient).

        Each expert's weights are sliced once, and its group runs as full tiles of
        `loop_tile` rows followed by tail tiles of `loop_tail` rows. With `out_needed`
        False only the gate products run. The inner loops have data-dependent trip
        counts, so there is no reverse-mode gradient: counting only. Rows with `real_M`
        False (padding tokens) land on a spare buffer row no tile reads: output 0.
        """
        M, D = xs_MD.shape
        E = group_sizes.shape[0]
        G = self.gate_proj.shape[-1]
        tb, ts = self.dispatch.loop_tile, self.dispatch.loop_tail
        padded, starts, pos = group_layout(e_sorted, group_sizes, ts)
        # Groups fill at most M + E*(ts-1) rows; one spare tile past that takes left-out rows.
        n_rows = max(-(-(M + E * (ts - 1)) // ts) * ts + ts, tb)
        pos = jnp.where(real_M, pos, n_rows - 1)
        x_buf = jnp.zeros((n_rows, D), self.dtype).at[pos].set(xs_MD)
        dot = functools.partial(jnp.matmul, precision=self.precision)

        def loop(with_y: bool):
            def expert(e, bufs):
                body = self._body(dot, None if keep_EG is None else keep_EG[e].astype(self.dtype), with_y)
                wg, wu, wd = self._weights(e)

                def tiles(size, base):
                    def tile(j, bufs):
                        y_buf, a_buf = bufs
                        start = base + j * size
                        y_tD, a_tG = body(jax.lax.dynamic_slice_in_dim(x_buf, start, size), wg, wu, wd)
                        if with_y:
                            y_buf = jax.lax.dynamic_update_slice_in_dim(y_buf, y_tD, start, 0)
                        if counting:
                            a_buf = jax.lax.dynamic_update_slice_in_dim(a_buf, a_tG, start, 0)
                        return y_buf, a_buf
                    return tile

                n_full = group_sizes[e] // tb
                bufs = jax.lax.fori_loop(0, n_full, tiles(tb, starts[e]), bufs)
                n_tail = (padded[e] - n_full * tb) // ts
                return jax.lax.fori_loop(0, n_tail, tiles(ts, starts[e] + n_full * tb), bufs)

            def run():
                init = (jnp.zeros((n_rows, D), self.dtype),
                        jnp.zeros((n_rows, G), self.gate_dtype or self.dtype) if counting else None)
                return jax.lax.fori_loop(0, E, expert, init)
            return run

        y_buf, a_buf = loop(True)() if out_needed is None else jax.lax.cond(out_needed, loop(True), loop(False))
        return y_buf[pos], a_buf[pos] if counting else None

    def _routed_per_shard(self, x_BTD, valid_BT, count_mask_BT, ablate, out_needed, sums):
        """`_routed` on each data shard's own rows, under `jax.shard_map` over "data" (the
        model axis stays automatic). Sorted over the whole batch, XLA gathered every shard's
        rows to every device, which then did the routed work of all of them. The layer's
        weights and the ablation masks enter as replicated arguments, not closed over: a
        gradient through the tiles' scan failed on closed-over weights (jax 0.10)."""
        graphdef, state = nnx.split(self)

        def shard(state, ablate, out_needed, x_BTD, valid_BT, count_mask_BT):
            return nnx.merge(graphdef, state)._routed(x_BTD, valid_BT, count_mask_BT, ablate, out_needed, sums)

        return jax.shard_map(shard, in_specs=(P(), P(), P(), P("data"), P("data"), P("data")), out_specs=P("data"),
                             axis_names=frozenset({"data"}), check_vma=False)(
            state, ablate, out_needed, x_BTD, valid_BT, count_mask_BT)

    def _routed(self, x_BTD, valid_BT, count_mask_BT, ablate, out_needed, sums):
        """The routed experts of `__call__` on rows [B, T, D]: (out [B, T, D], stats dict)."""
        dt = self.dtype
        B, T, D = x_BTD.shape
        E, k = self.router.shape[-1], self.top_k
        counting = count_mask_BT is not None
        impl = self.dispatch.moe_counting if counting else self.dispatch.moe_forward
        x_XD = x_BTD.reshape(B * T, D)
        logits_XE = jnp.matmul(x_XD, self.router[...].astype(dt), precision=self.precision)
        w_Xk, e_Xk, p_Xk, probs_XE = route(logits_XE, k, self.norm_topk_prob, ablate.get("expert_drop"),
                                           ablate.get("expert_drop_pre"))

        # Sort assignments by (expert, sequence): contiguous expert groups, and sorted segment
        # ids (expert * B + sequence) for the counts. "looped" also moves padding tokens past
        # every group (segment E * B), out of the work.
        e_M = e_Xk.reshape(-1)
        tok_M = jnp.repeat(jnp.arange(B * T, dtype=jnp.int32), k)
        seg_M = e_M * B + tok_M // T
        real_M = valid_BT.reshape(-1)[tok_M]
        if impl == "looped":
            seg_M = jnp.where(real_M, seg_M, E * B)
        order = jnp.argsort(seg_M, stable=True)
        e_sorted, tok_sorted, seg_sorted = e_M[order], tok_M[order], seg_M[order]
        group_sizes = jnp.bincount(jnp.where(real_M, e_M, E) if impl == "looped" else e_M,
                                   length=E + 1)[:E].astype(jnp.int32)
        xs_MD = x_XD[tok_sorted]
        keep_EG = ablate.get("expert_neuron_keep")
        if impl == "looped":
            y_MD, a_MG = self._looped(xs_MD, e_sorted, group_sizes, keep_EG, counting, real_M[order], out_needed)
        else:
            y_MD, a_MG = getattr(self, f"_{impl}")(xs_MD, e_sorted, group_sizes, keep_EG, counting)
        inv = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))

        stats = {}
        if counting:
            cm_X = count_mask_BT.reshape(-1)
            active_MG = (a_MG > 0) & cm_X[tok_sorted][:, None]
            reduce = functools.partial(expert_neuron_counts, seg_sorted_M=seg_sorted, inv_M=inv, e_Nk=e_Xk, B=B,
                                       E=E, method=self.dispatch.count_method, precision=self.precision)
            onehot_XkE = jax.nn.one_hot(e_Xk, E, dtype=jnp.int32) * cm_X[:, None, None]
            stats["expert_routed"] = onehot_XkE.sum(1).reshape(B, T, E).sum(1)
            stats["expert_neuron_active"] = reduce(active_MG)
            if sums:
                stats["expert_weight_sum"] = (onehot_XkE * p_Xk[..., None]).sum(1).reshape(B, T, E).sum(1)
                stats["expert_neuron_act_sum"] = reduce(jnp.where(active_MG, a_MG, 0).astype(jnp.float32))
            bad_M = jnp.any(~jnp.isfinite(a_MG), axis=-1)[inv] & real_M
            stats["nonfinite"] = jnp.any(bad_M.reshape(B, T * k), axis=1)
        if "expert_drop" in ablate:
            stats["router_probs"] = probs_XE.reshape(B, T, E)
        y_XkD = y_MD[inv].reshape(B * T, k, D)
        out_XD = jnp.einsum("XkD,Xk->XD", y_XkD.astype(jnp.float32), w_Xk, precision=self.precision)
        return out_XD.astype(dt).reshape(B, T, D), stats

    def __call__(self, x_BTD, valid_BT, count_mask_BT=None, ablate=None, out_needed=None, sums: bool = False):
        """Returns (out [B, T, D], stats dict or None).

        Args:
          x_BTD: FFN input (after the pre-norm).
          valid_BT: bool, real tokens.
          count_mask_BT: bool, tokens to count; None skips all counting.
          ablate: optional dict with "expert_drop" bool [E] and "expert_drop_pre" bool []
            (see `route`), "expert_neuron_keep" float [E, G], "neuron_keep" float [F]
            (shared expert).
          out_needed: traced bool (None means True): False lets "looped" skip the up
            and down products (counts-only last layer; other strategies compute them).
          sums: also return the activation and router-probability sums.

        Stats (when counting): "expert_routed" int32 [B, E], "expert_neuron_active"
        int32 [B, E, G], "nonfinite" bool [B] (a non-finite expert activation on a real
        token) and, with a shared expert, its `neuron_stats`; with `sums` also
        "expert_weight_sum" float32 [B, E] (router probabilities, before any
        renormalisation, over counted routed tokens) and "expert_neuron_act_sum"
        float32 [B, E, G] (A over counted routed tokens where A > 0).
        With "expert_drop": "router_probs" float32 [B, T, E], every expert's softmax
        probability before any is removed (the removed experts' sum is the routing mass
        the ablation dropped; the kept ones' measure each expert's mass in the pass).
        """
        ablate = ablate or {}
        if data_shards(x_BTD.shape[0]) > 1:
            out_BTD, stats = self._routed_per_shard(x_BTD, valid_BT, count_mask_BT, ablate, out_needed, sums)
        else:
            out_BTD, stats = self._routed(x_BTD, valid_BT, count_mask_BT, ablate, out_needed, sums)
        if self.has_shared:
            sh, sh_stats = self.shared_expert(x_BTD, valid_BT, count_mask_BT, ablate.get("neuron_keep"), out_needed,
                                              sums)
            g = jax.nn.sigmoid(jnp.einsum("BTD,DO->BTO", x_BTD, self.shared_expert_gate[...].astype(self.dtype),
                                          precision=self.precision))
            out_BTD = out_BTD + g * sh
            if count_mask_BT is not None:
                stats.update(sh_stats, nonfinite=stats["nonfinite"] | sh_stats["nonfinite"])
        return out_BTD, stats or None
